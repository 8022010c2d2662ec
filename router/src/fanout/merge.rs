//! Combining the shards' answers.

use std::cmp::Ordering;
use std::collections::HashMap;

use bytes::Bytes;

use super::value::{self, add_decimal, compare, order_for, Order};
use super::{ColumnMerge, FanoutError, Filter, FullMerge, MergeSpec, SortKey};
use crate::protocol::messages::{data_row, Builder, Reader};

/// One shard's answer: its RowDescription and DataRow messages, raw.
pub struct ShardResult {
    pub row_description: Bytes,
    pub rows: Vec<Bytes>,
}

pub struct Merged {
    pub row_description: Bytes,
    pub rows: Vec<Bytes>,
    pub command_tag: String,
}

pub type Row = Vec<Option<Vec<u8>>>;

fn malformed() -> FanoutError {
    FanoutError::Unsupported("a shard sent a malformed row".into())
}

/// One column of a RowDescription.
struct Field {
    name: String,
    table: i32,
    attnum: i16,
    type_oid: i32,
    size: i16,
    typmod: i32,
    format: i16,
}

fn fields(rd: &[u8]) -> Result<Vec<Field>, FanoutError> {
    let mut r = Reader::new(rd.get(5..).ok_or_else(malformed)?, "RowDescription");
    let n = r.i16().map_err(|_| malformed())?;
    (0..n)
        .map(|_| {
            Ok(Field {
                name: r.cstr().map_err(|_| malformed())?.to_string(),
                table: r.i32().map_err(|_| malformed())?,
                attnum: r.i16().map_err(|_| malformed())?,
                type_oid: r.i32().map_err(|_| malformed())?,
                size: r.i16().map_err(|_| malformed())?,
                typmod: r.i32().map_err(|_| malformed())?,
                format: r.i16().map_err(|_| malformed())?,
            })
        })
        .collect()
}

fn row_description(fields: &[Field]) -> Bytes {
    let mut b = Builder::new(b'T');
    b.i16(fields.len() as i16);
    for f in fields {
        b.cstr(&f.name).i32(f.table).i16(f.attnum).i32(f.type_oid).i16(f.size).i32(f.typmod).i16(f.format);
    }
    b.finish()
}

/// Type OIDs of a RowDescription's columns.
fn column_types(rd: &[u8]) -> Result<Vec<i32>, FanoutError> {
    Ok(fields(rd)?.iter().map(|f| f.type_oid).collect())
}

/// A merge made for the shards' answer described by `rd`: its `*` columns
/// in place.
pub fn bound(full: &FullMerge, rd: &[u8]) -> Result<FullMerge, FanoutError> {
    full.bind(&fields(rd)?.into_iter().map(|f| f.name).collect::<Vec<_>>())
}

/// Rows in the result formats a client's Bind asked for: no code means text for
/// all, one code applies to every column, else one per column. The shards
/// answer in text; binary columns are converted row by row.
pub struct ClientFormats {
    /// The RowDescription with the client's formats.
    pub row_description: Bytes,
    /// Per column: converted to binary, with its type.
    binary: Vec<Option<i32>>,
}

/// The columns of `rd`, checked against a Bind's result format codes (none, one
/// for all, or one per column), as Postgres checks them.
fn fields_for(rd: &[u8], formats: &[i16]) -> Result<Vec<Field>, FanoutError> {
    let fields = fields(rd)?;
    if formats.len() > 1 && formats.len() != fields.len() {
        return Err(FanoutError::Protocol(format!(
            "bind message has {} result formats but query has {} columns",
            formats.len(),
            fields.len()
        )));
    }
    Ok(fields)
}

impl ClientFormats {
    /// Checks the formats against the text RowDescription `rd`: a binary column
    /// of a type the router cannot convert exactly is refused before any row.
    pub fn new(rd: &Bytes, formats: &[i16]) -> Result<ClientFormats, FanoutError> {
        let mut fields = fields_for(rd, formats)?;
        let wants_binary = |i: usize| formats.get(i).or(formats.first()) == Some(&1);
        if !(0..fields.len()).any(wants_binary) {
            return Ok(ClientFormats { row_description: rd.clone(), binary: Vec::new() });
        }
        let mut binary = Vec::with_capacity(fields.len());
        for (i, f) in fields.iter_mut().enumerate() {
            if !wants_binary(i) {
                binary.push(None);
                continue;
            }
            if !value::has_binary(f.type_oid) {
                return Err(FanoutError::Unsupported(format!(
                    "cannot send column \"{}\" (type oid {}) of a cross-shard query in binary format; \
                     ask for it in text format, or add a tenant_id condition so the query runs on one shard",
                    f.name, f.type_oid
                )));
            }
            f.format = 1;
            binary.push(Some(f.type_oid));
        }
        Ok(ClientFormats { row_description: row_description(&fields), binary })
    }

    /// Rows the shards send in the client's formats already (a read whose rows
    /// are only relayed, never compared): only the RowDescription changes.
    pub fn as_sent(rd: &Bytes, formats: &[i16]) -> Result<ClientFormats, FanoutError> {
        let mut fields = fields_for(rd, formats)?;
        for (i, f) in fields.iter_mut().enumerate() {
            f.format = i16::from(formats.get(i).or(formats.first()) == Some(&1));
        }
        Ok(ClientFormats { row_description: row_description(&fields), binary: Vec::new() })
    }

    /// One shard row (text) as the client asked for it.
    pub fn row(&self, raw: &Bytes) -> Result<Bytes, FanoutError> {
        if self.binary.is_empty() {
            return Ok(raw.clone());
        }
        let mut row = decode_row(raw)?;
        for (v, oid) in row.iter_mut().zip(&self.binary) {
            let (Some(text), Some(oid)) = (v.as_ref(), oid) else { continue };
            *v = Some(value::to_binary(*oid, text).ok_or_else(|| {
                FanoutError::Protocol(format!(
                    "a shard sent {:?} as a value of type oid {oid}",
                    String::from_utf8_lossy(text)
                ))
            })?);
        }
        Ok(data_row(row.iter().map(|v| v.as_deref())))
    }
}

/// The merged answer (text values) in the formats a Bind asked for.
/// Returns the RowDescription and the rows.
pub fn in_formats(merged: &Merged, formats: &[i16]) -> Result<(Bytes, Vec<Bytes>), FanoutError> {
    let f = ClientFormats::new(&merged.row_description, formats)?;
    let rows = merged.rows.iter().map(|r| f.row(r)).collect::<Result<Vec<_>, _>>()?;
    Ok((f.row_description, rows))
}

pub(crate) fn decode_row(raw: &[u8]) -> Result<Row, FanoutError> {
    let mut r = Reader::new(raw.get(5..).ok_or_else(malformed)?, "DataRow");
    let n = r.i16().map_err(|_| malformed())?;
    (0..n).map(|_| r.value().map(|v| v.map(<[u8]>::to_vec)).map_err(|_| malformed())).collect()
}

/// Merges the shards' answers. `c_collation`: the shards compare text bytewise,
/// so the router may sort text too.
pub fn merge(spec: &MergeSpec, results: Vec<ShardResult>, c_collation: bool) -> Result<Merged, FanoutError> {
    let first = results.first().ok_or_else(|| FanoutError::Unsupported("no shard answered".into()))?;
    let row_description = first.row_description.clone();
    let full = match spec {
        MergeSpec::Concat => {
            let rows: Vec<Bytes> = results.into_iter().flat_map(|r| r.rows).collect();
            return Ok(Merged { command_tag: format!("SELECT {}", rows.len()), row_description, rows });
        }
        MergeSpec::Full(f) => bound(f, &row_description)?,
    };
    let mut types = column_types(&row_description)?;
    let mut rows: Vec<Row> = Vec::new();
    for r in &results {
        for raw in &r.rows {
            rows.push(decode_row(raw)?);
        }
    }
    check_average_types(&full.columns, &types)?;
    if full.grouped {
        rows = regroup(&full.columns, &types, rows, c_collation)?;
    }
    divide_averages(&full.columns, &mut types, &mut rows)?;
    if let Some(having) = &full.having {
        rows = keep_groups(having, rows, &types, c_collation)?;
    }
    let row_description = if full.visible < full.columns.len() {
        rows.iter_mut().for_each(|r| r.truncate(full.visible));
        averages_row_description(&row_description, &full.columns[..full.visible])?
    } else {
        row_description
    };
    if !full.order.is_empty() {
        let orders = sort_keys(&full.order, &types, c_collation)?;
        for row in &rows {
            check_row(&orders, row)?;
        }
        rows.sort_by(|a, b| compare_rows(&orders, a, b));
        if let Some(n) = full.distinct {
            // The sort is stable: the first of equal rows is the first shard's.
            rows.dedup_by(|later, first| compare_rows(&orders[..n], first, later) == Ordering::Equal);
        }
    }
    let start = (full.offset as usize).min(rows.len());
    let end = match full.limit {
        Some(l) => start.saturating_add(l as usize).min(rows.len()),
        None => rows.len(),
    };
    let rows: Vec<Bytes> = rows[start..end].iter().map(|r| data_row(r.iter().map(|v| v.as_deref()))).collect();
    Ok(Merged { command_tag: format!("SELECT {}", rows.len()), row_description, rows })
}

/// The combined groups HAVING keeps.
fn keep_groups(having: &Filter, rows: Vec<Row>, types: &[i32], c_collation: bool) -> Result<Vec<Row>, FanoutError> {
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows {
        if having.keeps(&row, types, c_collation)? {
            kept.push(row);
        }
    }
    Ok(kept)
}

/// Averages merge exactly when their sums are exact: integers and numerics.
fn check_average_types(columns: &[ColumnMerge], types: &[i32]) -> Result<(), FanoutError> {
    for (i, merge) in columns.iter().enumerate() {
        if matches!(merge, ColumnMerge::Avg(_)) && !matches!(types.get(i), Some(&value::INT8 | &value::NUMERIC)) {
            return Err(FanoutError::Unsupported(
                "cannot merge avg() of this type exactly across shards (only integer and numeric values); \
                 use avg(x::numeric), or add a tenant_id condition so the query runs on one shard"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// Err when one of the row's sort values cannot be compared exactly.
pub(crate) fn check_row(keys: &[(SortKey, Order)], row: &Row) -> Result<(), FanoutError> {
    for (k, order) in keys {
        if let Some(Some(v)) = row.get(k.column) {
            value::check_sortable(*order, v)?;
        }
    }
    Ok(())
}

/// How two rows compare under ORDER BY's keys, NULLs placed as each key says.
pub(crate) fn compare_rows(keys: &[(SortKey, Order)], a: &Row, b: &Row) -> Ordering {
    for (k, order) in keys {
        let (x, y) = (a.get(k.column).and_then(Option::as_ref), b.get(k.column).and_then(Option::as_ref));
        let o = match (x, y) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) if k.nulls_first => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) if k.nulls_first => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => {
                let o = compare(*order, x, y);
                if k.descending {
                    o.reverse()
                } else {
                    o
                }
            }
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// The comparison for each ORDER BY key, from the columns' types.
pub fn sort_keys(order: &[SortKey], types: &[i32], c_collation: bool) -> Result<Vec<(SortKey, Order)>, FanoutError> {
    order
        .iter()
        .map(|k| {
            let t = types.get(k.column).copied().ok_or_else(malformed)?;
            Ok((*k, order_for(t, c_collation || k.bytewise)?))
        })
        .collect()
}

/// Type OIDs of a RowDescription's columns.
pub fn types_of(rd: &[u8]) -> Result<Vec<i32>, FanoutError> {
    column_types(rd)
}

/// Turns each average's merged sum into the average, with its count.
fn divide_averages(columns: &[ColumnMerge], types: &mut [i32], rows: &mut [Row]) -> Result<(), FanoutError> {
    for (i, merge) in columns.iter().enumerate() {
        let ColumnMerge::Avg(count) = *merge else { continue };
        types[i] = value::NUMERIC;
        for row in rows.iter_mut() {
            let n = row.get(count).ok_or_else(malformed)?.clone();
            let sum = row.get_mut(i).ok_or_else(malformed)?;
            *sum = match (sum.take(), n) {
                (Some(s), Some(n)) if n != b"0" => {
                    let (s, n) = (String::from_utf8_lossy(&s), String::from_utf8_lossy(&n));
                    Some(value::avg_decimal(&s, &n).ok_or_else(malformed)?.into_bytes())
                }
                _ => None,
            };
        }
    }
    Ok(())
}

/// The shards' RowDescription without the hidden counts, and with averages as
/// numeric (what Postgres's avg of integers and numerics returns).
fn averages_row_description(rd: &[u8], columns: &[ColumnMerge]) -> Result<Bytes, FanoutError> {
    let mut fields = fields(rd)?;
    fields.truncate(columns.len());
    for (f, merge) in fields.iter_mut().zip(columns) {
        if let ColumnMerge::Avg(_) = merge {
            (f.type_oid, f.size, f.typmod) = (value::NUMERIC, -1, -1);
        }
    }
    Ok(row_description(&fields))
}

/// Combines the shards' per-group partial aggregates into one row per group.
fn regroup(columns: &[ColumnMerge], types: &[i32], rows: Vec<Row>, c_collation: bool) -> Result<Vec<Row>, FanoutError> {
    if columns.len() != types.len() {
        return Err(malformed());
    }
    let keys: Vec<usize> = (0..columns.len()).filter(|&i| columns[i] == ColumnMerge::Key).collect();
    let mut index: HashMap<Vec<Option<Vec<u8>>>, usize> = HashMap::new();
    let mut out: Vec<Row> = Vec::new();
    for row in rows {
        if row.len() != columns.len() {
            return Err(malformed());
        }
        let key = keys
            .iter()
            .map(|&i| row[i].as_deref().map(|v| value::group_form(types[i], v)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let Some(&at) = index.get(&key) else {
            index.insert(key, out.len());
            out.push(row);
            continue;
        };
        let acc = &mut out[at];
        for (i, merge) in columns.iter().enumerate() {
            let Some(v) = row[i].as_ref() else { continue };
            let Some(a) = acc[i].clone() else {
                acc[i] = Some(v.clone());
                continue;
            };
            let (sa, sv) = (String::from_utf8_lossy(&a).to_string(), String::from_utf8_lossy(v).to_string());
            acc[i] = Some(match merge {
                ColumnMerge::Key | ColumnMerge::Dependent => a,
                ColumnMerge::Count => add_decimal(&sa, &sv).ok_or_else(malformed)?.into_bytes(),
                ColumnMerge::Sum | ColumnMerge::Avg(_) => {
                    if matches!(types[i], value::FLOAT4 | value::FLOAT8) {
                        return Err(FanoutError::Unsupported(
                            "cannot merge a sum of floating-point values exactly across shards; sum a numeric (x::numeric) or add a tenant_id condition".into(),
                        ));
                    }
                    add_decimal(&sa, &sv).ok_or_else(malformed)?.into_bytes()
                }
                ColumnMerge::Min | ColumnMerge::Max => {
                    let order = order_for(types[i], c_collation)?;
                    value::check_sortable(order, &a)?;
                    value::check_sortable(order, v)?;
                    let o = compare(order, &a, v);
                    let take = if *merge == ColumnMerge::Min { o == Ordering::Greater } else { o == Ordering::Less };
                    if take {
                        v.clone()
                    } else {
                        a
                    }
                }
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::{FullMerge, SortKey};
    use crate::protocol::messages::{row_description, Column};

    fn rd(types: &[i32]) -> Bytes {
        let cols: Vec<Column<'_>> = types.iter().map(|t| Column { name: "c", type_oid: *t, type_size: -1 }).collect();
        row_description(&cols)
    }

    fn rows(vals: &[&[Option<&str>]]) -> Vec<Bytes> {
        vals.iter().map(|r| data_row(r.iter().map(|v| v.map(str::as_bytes)))).collect()
    }

    fn texts(m: &Merged) -> Vec<Vec<Option<String>>> {
        m.rows
            .iter()
            .map(|r| decode_row(r).unwrap().into_iter().map(|v| v.map(|b| String::from_utf8(b).unwrap())).collect())
            .collect()
    }

    #[test]
    fn sorted_rows_merge_with_nulls_limit_and_offset() {
        let spec = MergeSpec::Full(Box::new(FullMerge {
            columns: vec![ColumnMerge::Key],
            visible: 1,
            grouped: false,
            order: vec![SortKey { column: 0, descending: true, nulls_first: true, bytewise: false }],
            limit: Some(3),
            offset: 1,
            ..Default::default()
        }));
        let a =
            ShardResult { row_description: rd(&[value::INT8]), rows: rows(&[&[None], &[Some("10")], &[Some("2")]]) };
        let b = ShardResult { row_description: rd(&[value::INT8]), rows: rows(&[&[Some("9")], &[Some("3")]]) };
        let m = merge(&spec, vec![a, b], false).unwrap();
        let got: Vec<Option<String>> = texts(&m).into_iter().map(|r| r[0].clone()).collect();
        assert_eq!(got, vec![Some("10".into()), Some("9".into()), Some("3".into())]);
        assert_eq!(m.command_tag, "SELECT 3");
    }

    #[test]
    fn partial_aggregates_combine_per_group() {
        let spec = MergeSpec::Full(Box::new(FullMerge {
            columns: vec![ColumnMerge::Key, ColumnMerge::Count, ColumnMerge::Sum, ColumnMerge::Min, ColumnMerge::Max],
            visible: 5,
            grouped: true,
            order: vec![SortKey { column: 0, descending: false, nulls_first: false, bytewise: false }],
            limit: None,
            offset: 0,
            ..Default::default()
        }));
        let types = [value::TEXT, value::INT8, value::NUMERIC, value::NUMERIC, value::INT4];
        let a = ShardResult {
            row_description: rd(&types),
            rows: rows(&[
                &[Some("x"), Some("2"), Some("3.50"), Some("-1"), Some("7")],
                &[Some("y"), Some("1"), None, None, None],
            ]),
        };
        let b = ShardResult {
            row_description: rd(&types),
            rows: rows(&[&[Some("x"), Some("3"), Some("1.5"), Some("-10.5"), Some("12")]]),
        };
        let m = merge(&spec, vec![a, b], true).unwrap();
        assert_eq!(
            texts(&m),
            vec![
                vec![Some("x".into()), Some("5".into()), Some("5.00".into()), Some("-10.5".into()), Some("12".into())],
                vec![Some("y".into()), Some("1".into()), None, None, None],
            ]
        );
    }

    #[test]
    fn averages_divide_the_merged_sums_and_drop_their_counts() {
        let spec = MergeSpec::Full(Box::new(FullMerge {
            columns: vec![ColumnMerge::Key, ColumnMerge::Avg(2), ColumnMerge::Count],
            visible: 2,
            grouped: true,
            order: vec![SortKey { column: 1, descending: false, nulls_first: false, bytewise: false }],
            limit: None,
            offset: 0,
            ..Default::default()
        }));
        let types = [value::TEXT, value::INT8, value::INT8];
        let a = ShardResult {
            row_description: rd(&types),
            rows: rows(&[&[Some("x"), Some("7"), Some("2")], &[Some("y"), None, Some("0")]]),
        };
        let b = ShardResult { row_description: rd(&types), rows: rows(&[&[Some("x"), Some("3"), Some("1")]]) };
        let m = merge(&spec, vec![a, b], true).unwrap();
        assert_eq!(
            texts(&m),
            vec![vec![Some("x".into()), Some("3.3333333333333333".into())], vec![Some("y".into()), None]]
        );
        assert_eq!(column_types(&m.row_description).unwrap(), vec![value::TEXT, value::NUMERIC]);
        // Floats sum differently in another order: refused, even from one shard.
        let floats = ShardResult { row_description: rd(&[value::TEXT, value::FLOAT8, value::INT8]), rows: vec![] };
        assert!(merge(&spec, vec![floats], true).is_err());
    }

    #[test]
    fn float_sums_and_text_sorts_outside_c_are_refused() {
        let spec = MergeSpec::Full(Box::new(FullMerge {
            columns: vec![ColumnMerge::Sum],
            visible: 1,
            grouped: true,
            order: vec![],
            limit: None,
            offset: 0,
            ..Default::default()
        }));
        let part = || ShardResult { row_description: rd(&[value::FLOAT8]), rows: rows(&[&[Some("0.1")]]) };
        assert!(merge(&spec, vec![part(), part()], true).is_err());
        assert!(order_for(value::TEXT, false).is_err());
    }
}
