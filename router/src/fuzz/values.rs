//! The fan-out's readers of values in Postgres's text output.

use std::cmp::Ordering;

use super::Input;
use crate::fanout::value::{
    add_decimal, avg_decimal, check_sortable, compare, compare_numeric, group_form, has_binary, order_for, to_binary,
    Order, BOOL, BPCHAR, DATE, FLOAT8, INT2, INT4, INT8, NUMERIC, OID, TEXT, TIMESTAMP, UUID,
};

const TYPES: [i32; 12] = [BOOL, INT2, INT4, INT8, OID, FLOAT8, NUMERIC, TEXT, BPCHAR, UUID, DATE, TIMESTAMP];

/// Two values (split at the first NUL) of a type chosen by the input.
/// Properties: nothing panics; comparison is antisymmetric and agrees with
/// group forms (equal numerics group together, unequal ones apart); decimal
/// addition is commutative, exact (checked against i128 where it fits) and
/// keeps the larger scale; adding zero keeps a value's order; a numeric's
/// binary form decodes to the same value; an average lies between the
/// smallest and largest possible value.
pub fn values(data: &[u8]) {
    let mut input = Input::new(data);
    let ty = TYPES[input.below(TYPES.len())];
    let a = input.until(0);
    let b = input.rest();
    let (sa, sb) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));

    let _ = has_binary(ty);
    let _ = to_binary(ty, a);
    let ga = group_form(ty, a);
    let gb = group_form(ty, b);
    if let Ok(order) = order_for(ty, true) {
        let sortable = check_sortable(order, a).is_ok() && check_sortable(order, b).is_ok();
        let ab = compare(order, a, b);
        assert_eq!(ab, compare(order, b, a).reverse(), "comparison is not antisymmetric");
        assert_eq!(compare(order, a, a), Ordering::Equal);
        if order == Order::Numeric && sortable && numeric(&sa) && numeric(&sb) {
            let (ga, gb) = (ga.as_ref().unwrap(), gb.as_ref().unwrap());
            assert_eq!(ab == Ordering::Equal, ga == gb, "group forms of {sa:?} and {sb:?} disagree with comparison");
        }
    }

    // Decimal arithmetic on the two texts.
    let sum = add_decimal(&sa, &sb);
    assert_eq!(sum, add_decimal(&sb, &sa), "addition is not commutative");
    if let Some(sum) = &sum {
        if numeric(&sa) && numeric(&sb) {
            let scale = |s: &str| s.split_once('.').map_or(0, |(_, f)| f.len());
            assert_eq!(scale(sum), scale(&sa).max(scale(&sb)), "{sa} + {sb} = {sum}: scale");
            if let (Some(x), Some(y), Some(z)) =
                (scaled(&sa, scale(sum)), scaled(&sb, scale(sum)), scaled(sum, scale(sum)))
            {
                if let Some(want) = x.checked_add(y) {
                    assert_eq!(z, want, "{sa} + {sb} = {sum}");
                }
            }
            let zero = add_decimal(&sa, "0").unwrap();
            assert_eq!(compare_numeric(&zero, &sa), Ordering::Equal, "{sa} + 0 = {zero}");
            // a + b compares with a as b compares with 0.
            assert_eq!(compare_numeric(sum, &sa), compare_numeric(&sb, "0"), "{sa} + {sb} = {sum}");
            if let Some(bin) = to_binary(NUMERIC, sum.as_bytes()) {
                assert_eq!(compare_numeric(&numeric_from_binary(&bin), sum), Ordering::Equal, "binary of {sum}");
            }
        }
    }
    if let Some(bin) = to_binary(NUMERIC, a) {
        let back = numeric_from_binary(&bin);
        assert_eq!(compare_numeric(&back, &sa), Ordering::Equal, "binary of {sa:?} reads back as {back}");
    }
    if numeric(&sa) {
        let count = (sb.len() % 1000 + 1).to_string();
        let avg = avg_decimal(&sa, &count).expect("an average of a number");
        // avg * count is the sum within count units of the last digit.
        let scale = avg.split_once('.').map_or(0, |(_, f)| f.len());
        if scale <= 30 && sa.len() < 20 {
            if let (Some(x), Some(q)) = (scaled(&sa, scale), scaled(&avg, scale)) {
                let n: i128 = count.parse().unwrap();
                assert!((q * n - x).abs() <= n, "avg({sa}) over {count} is {avg}");
            }
        }
    }
}

/// A plain decimal as the fan-out receives them: optional minus, digits, an
/// optional fraction.
fn numeric(s: &str) -> bool {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    !int.is_empty()
        && int.bytes().all(|c| c.is_ascii_digit())
        && (frac.is_empty() || frac.bytes().all(|c| c.is_ascii_digit()))
        && !body.ends_with('.')
}

/// The decimal times 10^scale as an integer, if it fits.
fn scaled(s: &str, scale: usize) -> Option<i128> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if frac.len() > scale || int.len() + scale > 34 {
        return None;
    }
    let digits = format!("{int}{frac:0<scale$}");
    let v: i128 = digits.parse().ok()?;
    Some(if neg { -v } else { v })
}

/// A numeric's text from numeric_send's form.
fn numeric_from_binary(b: &[u8]) -> String {
    let word = |i: usize| i16::from_be_bytes([b[2 * i], b[2 * i + 1]]);
    let (n, weight, sign) = (word(0) as usize, word(1) as i64, word(2) as u16);
    match sign {
        0xC000 => return "NaN".into(),
        0xD000 => return "Infinity".into(),
        0xF000 => return "-Infinity".into(),
        _ => {}
    }
    assert_eq!(b.len(), 8 + 2 * n, "numeric binary length");
    let digits: Vec<i16> = (0..n).map(|i| word(4 + i)).collect();
    assert!(digits.iter().all(|d| (0..10000).contains(d)), "a base-10000 digit out of range");
    let mut int = String::new();
    let mut frac = String::new();
    for (i, d) in digits.iter().enumerate() {
        let w = weight - i as i64;
        if w >= 0 {
            int.push_str(&format!("{d:04}"));
        } else {
            frac.push_str(&format!("{d:04}"));
        }
    }
    // Groups of zeros between the last digit and the point, or the point and the first.
    let last_weight = weight - n as i64 + 1;
    for _ in 0..last_weight.max(0) {
        int.push_str("0000");
    }
    let lead = if n > 0 && weight < -1 { (-1 - weight) as usize } else { 0 };
    let frac = format!("{}{frac}", "0000".repeat(lead));
    let int = int.trim_start_matches('0');
    format!("{}{}.{}0", if sign == 0x4000 { "-" } else { "" }, if int.is_empty() { "0" } else { int }, frac)
}
