//! Comparing and adding values in Postgres's text output format, by type.

use std::cmp::Ordering;

use super::FanoutError;

pub const BOOL: i32 = 16;
pub const INT8: i32 = 20;
pub const INT2: i32 = 21;
pub const INT4: i32 = 23;
pub const OID: i32 = 26;
pub const FLOAT4: i32 = 700;
pub const FLOAT8: i32 = 701;
pub const NUMERIC: i32 = 1700;
pub const DATE: i32 = 1082;
pub const TIMESTAMP: i32 = 1114;
pub const UUID: i32 = 2950;
pub const TIMESTAMPTZ: i32 = 1184;
pub const TIME: i32 = 1083;
pub const BYTEA: i32 = 17;
pub const TEXT: i32 = 25;
pub const VARCHAR: i32 = 1043;
pub const BPCHAR: i32 = 1042;
pub const NAME: i32 = 19;

/// How values of one column compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Integer,
    Float,
    Numeric,
    Bool,
    /// Byte order equals value order (uuids, and text under the C collation).
    Bytes,
    /// char(n): bytes without the trailing spaces (which char(n) ignores).
    Padded,
    /// Dates and timestamps in DateStyle ISO: by era and year, then by bytes
    /// (`0044-03-15 BC` before `0001-01-01`, `10000-01-01` after `9999-12-31`).
    DateTime,
}

/// How a column of this type sorts, if the router can sort it exactly.
pub fn order_for(type_oid: i32, c_collation: bool) -> Result<Order, FanoutError> {
    Ok(match type_oid {
        INT2 | INT4 | INT8 | OID => Order::Integer,
        FLOAT4 | FLOAT8 => Order::Float,
        NUMERIC => Order::Numeric,
        BOOL => Order::Bool,
        DATE | TIMESTAMP => Order::DateTime,
        UUID => Order::Bytes,
        BPCHAR if c_collation => Order::Padded,
        TEXT | VARCHAR | NAME if c_collation => Order::Bytes,
        TEXT | VARCHAR | BPCHAR | NAME => {
            return Err(FanoutError::Unsupported(
                "cannot sort text across shards under a collation other than C; ORDER BY col COLLATE \"C\" for byte order, or add a tenant_id condition so the query runs on one shard".into(),
            ))
        }
        other => {
            return Err(FanoutError::Unsupported(format!(
                "cannot sort values of type oid {other} across shards; add a tenant_id condition so the query runs on one shard"
            )))
        }
    })
}

fn unpadded(v: &[u8]) -> &[u8] {
    &v[..v.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1)]
}

/// A group key's value in a form where equal values (as GROUP BY compares
/// them) have equal bytes: numerics by value (`1.5` and `1.50` are one group),
/// `-0` and `0` as one float, char(n) without its padding. Err for a type
/// whose text is not one per value (intervals: `1 day` = `24:00:00`; jsonb)
/// or that the router does not know.
pub fn group_form(type_oid: i32, v: &[u8]) -> Result<Vec<u8>, FanoutError> {
    Ok(match type_oid {
        NUMERIC => match parse_dec(&String::from_utf8_lossy(v)) {
            Some(d) if is_zero(&d) => b"0".to_vec(),
            Some(d) => {
                let frac = d.frac.trim_end_matches('0');
                format!("{}{}.{frac}", if d.negative { "-" } else { "" }, d.int).into_bytes()
            }
            None => v.to_vec(), // NaN, ±Infinity
        },
        FLOAT4 | FLOAT8 if v == b"-0" => b"0".to_vec(),
        BPCHAR => unpadded(v).to_vec(),
        INT2 | INT4 | INT8 | OID | BOOL | FLOAT4 | FLOAT8 | TEXT | VARCHAR | NAME | UUID | DATE | TIMESTAMP
        | TIMESTAMPTZ | TIME | BYTEA => v.to_vec(),
        other => {
            return Err(FanoutError::Unsupported(format!(
                "cannot merge GROUP BY on a column of type oid {other} across shards (equal values may be written \
                 differently); group by a column of another type, or add a tenant_id condition so the query runs on one shard"
            )))
        }
    })
}

/// Err when a value cannot be compared exactly under `order`: a date or
/// timestamp not in DateStyle ISO (`12/04/2026` sorts by month first).
pub fn check_sortable(order: Order, v: &[u8]) -> Result<(), FanoutError> {
    if order == Order::DateTime && datetime_key(v).is_none() {
        return Err(FanoutError::Unsupported(format!(
            "cannot sort or compare dates across shards unless DateStyle is ISO (a shard sent \"{}\"); \
             SET DateStyle = ISO for this query, or add a tenant_id condition so the query runs on one shard",
            String::from_utf8_lossy(&v[..v.len().min(40)])
        )));
    }
    Ok(())
}

/// An ISO date or timestamp (`YYYY-MM-DD[ HH:MM:SS[.ffffff]][ BC]`, the year
/// four digits or more, or ±infinity) as a key that sorts as the value does:
/// (-1 | 0 | 1 for -infinity, finite, infinity; the astronomical year; the rest).
fn datetime_key(s: &[u8]) -> Option<(i8, i64, &[u8])> {
    match s {
        b"-infinity" => return Some((-1, 0, b"")),
        b"infinity" => return Some((1, 0, b"")),
        _ => {}
    }
    let (body, bc) = match s.strip_suffix(b" BC") {
        Some(b) => (b, true),
        None => (s, false),
    };
    let dash = body.iter().position(|&c| c == b'-')?;
    let (year, rest) = body.split_at(dash);
    let digits = |b: &[u8]| !b.is_empty() && b.iter().all(u8::is_ascii_digit);
    if year.len() < 4 || year.len() > 9 || !digits(year) {
        return None;
    }
    // `9` stands for a digit.
    let shaped = |b: &[u8], pattern: &[u8]| {
        b.len() == pattern.len()
            && b.iter().zip(pattern).all(|(c, p)| if *p == b'9' { c.is_ascii_digit() } else { c == p })
    };
    let ok = match rest.len() {
        6 => shaped(rest, b"-99-99"),
        15 => shaped(rest, b"-99-99 99:99:99"),
        n if n > 16 => shaped(&rest[..16], b"-99-99 99:99:99.") && digits(&rest[16..]),
        _ => false,
    };
    if !ok {
        return None;
    }
    let y: i64 = std::str::from_utf8(year).ok()?.parse().ok()?;
    Some((0, if bc { 1 - y } else { y }, rest))
}

pub fn compare(order: Order, a: &[u8], b: &[u8]) -> Ordering {
    let (sa, sb) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    match order {
        Order::Integer => match (sa.parse::<i128>(), sb.parse::<i128>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        },
        Order::Float => {
            let f = |s: &str| match s {
                "NaN" => f64::NAN,
                "Infinity" => f64::INFINITY,
                "-Infinity" => f64::NEG_INFINITY,
                s => s.parse().unwrap_or(f64::NAN),
            };
            let (x, y) = (f(&sa), f(&sb));
            // Postgres sorts NaN above every other value.
            match (x.is_nan(), y.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                _ => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            }
        }
        Order::Numeric => compare_numeric(&sa, &sb),
        Order::Bool => a.cmp(b), // "f" < "t"
        Order::Bytes => a.cmp(b),
        Order::Padded => unpadded(a).cmp(unpadded(b)),
        Order::DateTime => match (datetime_key(a), datetime_key(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            // check_sortable refused such values before any comparison.
            _ => a.cmp(b),
        },
    }
}

/// A decimal in text form: sign, integer digits (no leading zeros), fraction digits.
struct Dec {
    negative: bool,
    int: String,
    frac: String,
}

fn parse_dec(s: &str) -> Option<Dec> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let int = int.trim_start_matches('0').to_string();
    Some(Dec { negative, int, frac: frac.to_string() })
}

fn magnitude_cmp(a: &Dec, b: &Dec) -> Ordering {
    a.int.len().cmp(&b.int.len()).then_with(|| a.int.cmp(&b.int)).then_with(|| {
        let width = a.frac.len().max(b.frac.len());
        let pad = |f: &str| format!("{f:0<width$}");
        pad(&a.frac).cmp(&pad(&b.frac))
    })
}

fn is_zero(d: &Dec) -> bool {
    d.int.is_empty() && d.frac.bytes().all(|c| c == b'0')
}

pub fn compare_numeric(a: &str, b: &str) -> Ordering {
    // Postgres orders -Infinity < every number < Infinity < NaN.
    let rank = |s: &str| match s {
        "-Infinity" => 0,
        "Infinity" => 2,
        "NaN" => 3,
        _ => 1,
    };
    match (rank(a), rank(b)) {
        (1, 1) => {}
        (x, y) => return x.cmp(&y),
    }
    let (Some(x), Some(y)) = (parse_dec(a), parse_dec(b)) else { return a.cmp(b) };
    let xn = x.negative && !is_zero(&x);
    let yn = y.negative && !is_zero(&y);
    match (xn, yn) {
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
        (false, false) => magnitude_cmp(&x, &y),
        (true, true) => magnitude_cmp(&y, &x),
    }
}

/// Exact sum of two decimals (integers or numerics) in text form. The result
/// keeps the larger scale, as Postgres's numeric addition does.
/// NaN and the infinities add as in Postgres: NaN wins, opposite infinities
/// make NaN, an infinity absorbs any finite value.
pub fn add_decimal(a: &str, b: &str) -> Option<String> {
    match (a, b) {
        ("NaN", _) | (_, "NaN") => return Some("NaN".into()),
        ("Infinity", "-Infinity") | ("-Infinity", "Infinity") => return Some("NaN".into()),
        ("Infinity" | "-Infinity", _) => return parse_dec(b).map(|_| a.into()).or_else(|| (a == b).then(|| a.into())),
        (_, "Infinity" | "-Infinity") => return parse_dec(a).map(|_| b.into()),
        _ => {}
    }
    let (x, y) = (parse_dec(a)?, parse_dec(b)?);
    let scale = x.frac.len().max(y.frac.len());
    let digits = |d: &Dec| -> Vec<u8> {
        let s = format!("{}{:0<scale$}", d.int, d.frac);
        s.bytes().rev().map(|c| c - b'0').collect()
    };
    let (dx, dy) = (digits(&x), digits(&y));
    let xn = x.negative && !is_zero(&x);
    let yn = y.negative && !is_zero(&y);
    let (negative, mag) = if xn == yn {
        (xn, add_mag(&dx, &dy))
    } else if magnitude_cmp(&x, &y) != Ordering::Less {
        (xn, sub_mag(&dx, &dy))
    } else {
        (yn, sub_mag(&dy, &dx))
    };
    Some(decimal_text(&mag, scale, negative))
}

/// A decimal's text from its digits (least significant first) and scale; zero
/// has no sign, as in Postgres.
fn decimal_text(digits: &[u8], scale: usize, negative: bool) -> String {
    let mut s: String = digits.iter().rev().map(|d| (d + b'0') as char).collect();
    while s.len() < scale + 1 {
        s.insert(0, '0');
    }
    let (int, frac) = s.split_at(s.len() - scale);
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let zero = int == "0" && frac.bytes().all(|c| c == b'0');
    let sign = if negative && !zero { "-" } else { "" };
    if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// `avg` as Postgres computes it for integer and numeric arguments: the exact
/// sum divided by the count with `numeric_div`, whose result scale gives at least
/// 16 significant digits and no fewer fraction digits than the sum has
/// (`select_div_scale` in numeric.c), rounded half away from zero. `count` is
/// the number of values summed, at least 1.
pub fn avg_decimal(sum: &str, count: &str) -> Option<String> {
    let n: u64 = count.parse().ok().filter(|&n| n > 0)?;
    match sum {
        "NaN" | "Infinity" | "-Infinity" => return Some(sum.into()),
        _ => {}
    }
    let d = parse_dec(sum)?;
    let (w1, first1) = base_10000_lead(&d.int, &d.frac);
    let (w2, first2) = base_10000_lead(&n.to_string(), "");
    let mut qweight = w1 - w2;
    if first1 <= first2 {
        qweight -= 1;
    }
    const MIN_SIG_DIGITS: i64 = 16;
    let rscale = (MIN_SIG_DIGITS - qweight * 4).max(d.frac.len() as i64).clamp(0, 1000) as usize;
    // sum * 10^rscale / n, as integers: the sum's digits, then zeros up to rscale.
    let digits = format!("{}{:0<rscale$}", d.int, d.frac);
    let mut quotient = String::with_capacity(digits.len());
    let mut rem: u128 = 0;
    for c in digits.bytes() {
        rem = rem * 10 + (c - b'0') as u128;
        quotient.push((b'0' + (rem / n as u128) as u8) as char);
        rem %= n as u128;
    }
    let mut q: Vec<u8> = quotient.bytes().rev().map(|c| c - b'0').collect();
    if rem * 2 >= n as u128 {
        q = add_mag(&q, &[1]);
    }
    Some(decimal_text(&q, rscale, d.negative))
}

/// The weight and leading digit of a decimal in Postgres's base-10000 form
/// (groups of four decimal digits either side of the point): (0, 0) for zero.
fn base_10000_lead(int: &str, frac: &str) -> (i64, u32) {
    let int = int.trim_start_matches('0');
    if !int.is_empty() {
        let lead = match int.len() % 4 {
            0 => 4,
            r => r,
        };
        return ((int.len() as i64 + 3) / 4 - 1, int[..lead].parse().unwrap_or(0));
    }
    let width = frac.len().div_ceil(4) * 4;
    let frac = format!("{frac:0<width$}");
    for (k, group) in frac.as_bytes().chunks(4).enumerate() {
        let g: u32 = std::str::from_utf8(group).ok().and_then(|g| g.parse().ok()).unwrap_or(0);
        if g != 0 {
            return (-(k as i64) - 1, g);
        }
    }
    (0, 0)
}

/// Whether [`to_binary`] converts values of this type.
pub fn has_binary(type_oid: i32) -> bool {
    matches!(type_oid, BOOL | INT2 | INT4 | INT8 | OID | NUMERIC | TEXT | VARCHAR | BPCHAR | NAME | UUID)
}

/// The binary send format of a value given in Postgres's text output, for the
/// types where the text alone decides it: booleans, integers, numerics, text
/// and uuids. None for other types (floats and date/times depend on session
/// settings such as extra_float_digits and DateStyle) and for text that does
/// not parse.
pub fn to_binary(type_oid: i32, text: &[u8]) -> Option<Vec<u8>> {
    let s = std::str::from_utf8(text).ok()?;
    Some(match type_oid {
        BOOL => match s {
            "t" => vec![1],
            "f" => vec![0],
            _ => return None,
        },
        INT2 => s.parse::<i16>().ok()?.to_be_bytes().to_vec(),
        INT4 => s.parse::<i32>().ok()?.to_be_bytes().to_vec(),
        INT8 => s.parse::<i64>().ok()?.to_be_bytes().to_vec(),
        OID => s.parse::<u32>().ok()?.to_be_bytes().to_vec(),
        NUMERIC => numeric_binary(s)?,
        TEXT | VARCHAR | BPCHAR | NAME => text.to_vec(),
        UUID => {
            let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
            if hex.len() != 32 {
                return None;
            }
            let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            hex.chunks(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect::<Option<Vec<u8>>>()?
        }
        _ => return None,
    })
}

/// numeric_send's form: digit count, weight, sign, display scale, then base-10000
/// digits without leading or trailing zero digits (zero: no digits, weight 0).
fn numeric_binary(s: &str) -> Option<Vec<u8>> {
    let header = |n: i16, weight: i16, sign: u16, dscale: u16| {
        let mut b = Vec::with_capacity(8 + 2 * n.max(0) as usize);
        b.extend(n.to_be_bytes());
        b.extend(weight.to_be_bytes());
        b.extend(sign.to_be_bytes());
        b.extend(dscale.to_be_bytes());
        b
    };
    // numeric_send writes a special value's display scale as NUMERIC_DSCALE
    // reads it from the stored short header, whose scale bits overlap the
    // infinities' sign codes: 32 for ±Infinity, 0 for NaN.
    match s {
        "NaN" => return Some(header(0, 0, 0xC000, 0)),
        "Infinity" => return Some(header(0, 0, 0xD000, 32)),
        "-Infinity" => return Some(header(0, 0, 0xF000, 32)),
        _ => {}
    }
    let d = parse_dec(s)?;
    let int_width = d.int.len().div_ceil(4) * 4;
    let frac_width = d.frac.len().div_ceil(4) * 4;
    let padded = format!("{:0>int_width$}{:0<frac_width$}", d.int, d.frac);
    let mut groups: Vec<i16> = padded
        .as_bytes()
        .chunks(4)
        .map(|g| std::str::from_utf8(g).ok().and_then(|g| g.parse().ok()))
        .collect::<Option<_>>()?;
    let mut weight = (int_width / 4) as i16 - 1;
    let lead = groups.iter().take_while(|&&g| g == 0).count();
    groups.drain(..lead);
    weight -= lead as i16;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let (weight, sign) = match (groups.is_empty(), d.negative) {
        (true, _) => (0, 0),
        (false, true) => (weight, 0x4000),
        (false, false) => (weight, 0),
    };
    let mut b = header(groups.len() as i16, weight, sign, u16::try_from(d.frac.len()).ok()?);
    for g in groups {
        b.extend(g.to_be_bytes());
    }
    Some(b)
}

fn add_mag(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len().max(b.len()) + 1);
    let mut carry = 0;
    for i in 0..a.len().max(b.len()) {
        let s = a.get(i).copied().unwrap_or(0) + b.get(i).copied().unwrap_or(0) + carry;
        out.push(s % 10);
        carry = s / 10;
    }
    if carry > 0 {
        out.push(carry);
    }
    out
}

/// a - b for |a| >= |b|.
fn sub_mag(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len());
    let mut borrow = 0i16;
    for (i, &x) in a.iter().enumerate() {
        let mut d = x as i16 - b.get(i).copied().unwrap_or(0) as i16 - borrow;
        borrow = if d < 0 {
            d += 10;
            1
        } else {
            0
        };
        out.push(d as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numerics_compare_by_value() {
        assert_eq!(compare_numeric("10", "9.99"), Ordering::Greater);
        assert_eq!(compare_numeric("-10", "-9.5"), Ordering::Less);
        assert_eq!(compare_numeric("1.50", "1.5"), Ordering::Equal);
        assert_eq!(compare_numeric("-0.00", "0"), Ordering::Equal);
        assert_eq!(compare_numeric("NaN", "1e9"), Ordering::Greater);
        let sorted = ["-Infinity", "-1000000", "-5.5", "0", "7", "Infinity", "NaN"];
        for w in sorted.windows(2) {
            assert_eq!(compare_numeric(w[0], w[1]), Ordering::Less, "{w:?}");
        }
    }

    #[test]
    fn decimal_sums_are_exact_and_keep_the_larger_scale() {
        assert_eq!(add_decimal("3.50", "1.5").unwrap(), "5.00");
        assert_eq!(add_decimal("-2", "1.25").unwrap(), "-0.75");
        assert_eq!(add_decimal("99999999999999999999999999999999", "1").unwrap(), "100000000000000000000000000000000");
        assert_eq!(add_decimal("-5", "5").unwrap(), "0");
        assert_eq!(add_decimal("0.1", "0.2").unwrap(), "0.3");
    }

    #[test]
    fn infinities_add_as_in_postgres() {
        assert_eq!(add_decimal("Infinity", "1.5").unwrap(), "Infinity");
        assert_eq!(add_decimal("2", "-Infinity").unwrap(), "-Infinity");
        assert_eq!(add_decimal("Infinity", "-Infinity").unwrap(), "NaN");
        assert_eq!(add_decimal("-Infinity", "-Infinity").unwrap(), "-Infinity");
        assert_eq!(add_decimal("NaN", "Infinity").unwrap(), "NaN");
        assert!(add_decimal("Infinity", "x").is_none());
    }

    #[test]
    fn averages_take_postgres_scale_and_rounding() {
        // Each expected value is what Postgres 15 prints for avg over the values.
        assert_eq!(avg_decimal("6", "3").unwrap(), "2.0000000000000000"); // avg of 1, 2, 3
        assert_eq!(avg_decimal("10", "3").unwrap(), "3.3333333333333333");
        assert_eq!(avg_decimal("20", "3").unwrap(), "6.6666666666666667");
        assert_eq!(avg_decimal("-20", "3").unwrap(), "-6.6666666666666667");
        assert_eq!(avg_decimal("100000", "3").unwrap(), "33333.333333333333");
        assert_eq!(avg_decimal("3.50", "2").unwrap(), "1.7500000000000000");
        assert_eq!(avg_decimal("0", "5").unwrap(), "0.00000000000000000000");
        assert_eq!(avg_decimal("NaN", "2").unwrap(), "NaN");
        assert_eq!(avg_decimal("-Infinity", "2").unwrap(), "-Infinity");
        assert!(avg_decimal("1", "0").is_none());
    }

    #[test]
    fn binary_forms_are_those_postgres_sends() {
        // numeric_send(...) on Postgres 15.
        let hex = |s: &str| {
            (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<u8>>()
        };
        assert_eq!(to_binary(NUMERIC, b"-0.00012").unwrap(), hex("0002ffff40000005000107d0"));
        assert_eq!(to_binary(NUMERIC, b"0.00").unwrap(), hex("0000000000000002"));
        assert_eq!(to_binary(NUMERIC, b"10000.5").unwrap(), hex("0003000100000001000100001388"));
        assert_eq!(to_binary(NUMERIC, b"-0").unwrap(), hex("0000000000000000"));
        assert_eq!(to_binary(NUMERIC, b"NaN").unwrap(), hex("00000000c0000000"));
        assert_eq!(to_binary(NUMERIC, b"Infinity").unwrap(), hex("00000000d0000020"));
        assert_eq!(to_binary(NUMERIC, b"-Infinity").unwrap(), hex("00000000f0000020"));
        assert_eq!(to_binary(INT8, b"-2").unwrap(), (-2i64).to_be_bytes());
        assert_eq!(to_binary(BOOL, b"t").unwrap(), [1]);
        assert_eq!(
            to_binary(UUID, b"00112233-4455-6677-8899-aabbccddeeff").unwrap(),
            hex("00112233445566778899aabbccddeeff")
        );
        assert_eq!(to_binary(FLOAT8, b"1.5"), None, "float text depends on extra_float_digits");
        assert_eq!(to_binary(INT4, b"x"), None);
    }

    #[test]
    fn iso_dates_sort_by_era_and_year_and_others_are_refused() {
        let sorted = [
            "-infinity",
            "4713-01-01 BC",
            "0044-03-15 BC",
            "0001-12-31 BC",
            "0001-01-01",
            "9999-12-31",
            "10000-01-01",
            "infinity",
        ];
        for w in sorted.windows(2) {
            assert_eq!(compare(Order::DateTime, w[0].as_bytes(), w[1].as_bytes()), Ordering::Less, "{w:?}");
        }
        let stamps = ["2026-12-04 11:39:55", "2026-12-04 11:39:55.25", "2026-12-04 11:39:55.5", "2026-12-04 11:39:56"];
        for w in stamps.windows(2) {
            assert_eq!(compare(Order::DateTime, w[0].as_bytes(), w[1].as_bytes()), Ordering::Less, "{w:?}");
        }
        for ok in sorted.iter().chain(&stamps) {
            assert!(check_sortable(Order::DateTime, ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in
            ["12/04/2026", "04.12.2026", "Fri Dec 04 2026", "2026-12-04T11:39:55", "26-12-04", "2026-12-04 11:39", ""]
        {
            assert!(check_sortable(Order::DateTime, bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn equal_group_keys_take_one_form() {
        let same = |t, a: &str, b: &str| group_form(t, a.as_bytes()).unwrap() == group_form(t, b.as_bytes()).unwrap();
        assert!(same(NUMERIC, "1.5", "1.50"));
        assert!(same(NUMERIC, "-0.00", "0"));
        assert!(same(NUMERIC, "10", "10.000"));
        assert!(!same(NUMERIC, "10", "1.0"));
        assert!(!same(NUMERIC, "-1.5", "1.5"));
        assert!(same(FLOAT8, "-0", "0"));
        assert!(same(BPCHAR, "ab  ", "ab"));
        assert!(!same(BPCHAR, " ab", "ab"));
        assert!(same(BPCHAR, "   ", ""));
        assert!(!same(TEXT, "ab ", "ab"));
        assert!(group_form(1186, b"1 day").is_err()); // interval
        assert!(group_form(3802, b"{}").is_err()); // jsonb
    }

    #[test]
    fn integers_and_floats_compare_as_numbers() {
        assert_eq!(compare(Order::Integer, b"10", b"9"), Ordering::Greater);
        assert_eq!(compare(Order::Float, b"NaN", b"Infinity"), Ordering::Greater);
        assert_eq!(compare(Order::Float, b"-1.5", b"1e-3"), Ordering::Less);
    }
}
