//! One server's answer to a query in one protocol, in the form two servers'
//! answers compare in: values as sent, loose columns by value, rows sorted
//! when ORDER BY leaves their order open.

use std::fmt;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::query::Query;
use crate::wire::Wire;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    /// A Query message; values in text.
    Simple,
    /// Parse, Bind (tenant keys and ids as int8 parameters), Execute, as tokio-postgres
    /// sends them; every value in binary.
    Extended,
}

pub type Value = Option<Vec<u8>>;

/// What a server said.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Column names (with types in the extended protocol) and rows.
    Rows {
        columns: Vec<(String, Option<Type>)>,
        rows: Vec<Vec<Value>>,
    },
    Error {
        code: String,
        message: String,
    },
}

impl Answer {
    pub async fn of(client: &Client, q: &Query, protocol: Protocol) -> Answer {
        let result = match protocol {
            Protocol::Simple => simple(client, &q.simple_sql()).await,
            Protocol::Extended => extended(client, q).await,
        };
        result.unwrap_or_else(|e| Answer::Error {
            code: e.code().map(|c| c.code().to_string()).unwrap_or_default(),
            message: e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string()),
        })
    }

    /// The answer as it compares: loose columns by value, rows sorted unless
    /// the query fixes their order.
    pub fn normalized(mut self, q: &Query) -> Answer {
        if let Answer::Rows { columns, rows } = &mut self {
            for row in rows.iter_mut() {
                for (i, v) in row.iter_mut().enumerate() {
                    if let (Some(true), Some(bytes)) = (q.loose.get(i), v.as_mut()) {
                        *bytes = by_value(bytes, columns.get(i).and_then(|c| c.1.as_ref()));
                    }
                }
            }
            if !q.ordered {
                rows.sort();
            }
        }
        self
    }

    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Answer::Error { code, .. } => Some(code),
            Answer::Rows { .. } => None,
        }
    }

    /// An error's message; empty for rows.
    pub fn message(&self) -> &str {
        match self {
            Answer::Error { message, .. } => message,
            Answer::Rows { .. } => "",
        }
    }
}

async fn simple(client: &Client, sql: &str) -> Result<Answer, tokio_postgres::Error> {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in client.simple_query(sql).await? {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| (c.name().to_string(), None)).collect();
            }
            SimpleQueryMessage::Row(r) => {
                rows.push((0..r.len()).map(|i| r.get(i).map(|s| s.as_bytes().to_vec())).collect());
            }
            _ => {}
        }
    }
    Ok(Answer::Rows { columns, rows })
}

async fn extended(client: &Client, q: &Query) -> Result<Answer, tokio_postgres::Error> {
    let types = vec![Type::INT8; q.params.len()];
    let statement = client.prepare_typed(&q.sql, &types).await?;
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        q.params.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
    let rows = client.query(&statement, &params).await?;
    let columns = statement.columns().iter().map(|c| (c.name().to_string(), Some(c.type_().clone()))).collect();
    let rows = rows.iter().map(|r| (0..r.len()).map(|i| r.get::<_, Wire>(i).0).collect()).collect();
    Ok(Answer::Rows { columns, rows })
}

/// One text for all equal values: numerics without trailing fraction zeros,
/// zero without a sign. `ty` is the column's type for a binary value, None
/// for text.
fn by_value(v: &[u8], ty: Option<&Type>) -> Vec<u8> {
    match ty {
        None => {
            let s = String::from_utf8_lossy(v);
            let plain = s.bytes().all(|c| c.is_ascii_digit() || c == b'-' || c == b'.');
            let s = if plain && s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { &s };
            match s {
                "-0" | "" => b"0".to_vec(),
                s => s.as_bytes().to_vec(),
            }
        }
        Some(t) if *t == Type::NUMERIC => numeric_by_value(v),
        Some(t) if *t == Type::FLOAT8 || *t == Type::FLOAT4 => {
            if v.iter().skip(1).all(|&b| b == 0) && v.first() == Some(&0x80) {
                vec![0; v.len()]
            } else {
                v.to_vec()
            }
        }
        Some(_) => v.to_vec(),
    }
}

/// A binary numeric (ndigits, weight, sign, dscale, then base-10000 digits)
/// without its display scale and trailing zero digits.
fn numeric_by_value(v: &[u8]) -> Vec<u8> {
    let word = |i: usize| u16::from_be_bytes([v[2 * i], v[2 * i + 1]]);
    if v.len() < 8 || word(2) >= 0xC000 {
        return v.to_vec(); // NaN, ±Infinity
    }
    let mut digits: Vec<u16> = (4..v.len() / 2).map(word).collect();
    while digits.last() == Some(&0) {
        digits.pop();
    }
    let (weight, sign) = if digits.is_empty() { (0, 0) } else { (word(1), word(2)) };
    let mut out = Vec::with_capacity(8 + 2 * digits.len());
    for w in [digits.len() as u16, weight, sign, 0].into_iter().chain(digits) {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (columns, rows) = match self {
            Answer::Error { code, message } => return write!(f, "ERROR {code}: {message}"),
            Answer::Rows { columns, rows } => (columns, rows),
        };
        let names: Vec<String> = columns
            .iter()
            .map(|(n, t)| match t {
                Some(t) => format!("{n} {t}"),
                None => n.clone(),
            })
            .collect();
        writeln!(f, "{} rows: {}", rows.len(), names.join(" | "))?;
        for row in rows.iter().take(40) {
            let values: Vec<String> = row.iter().map(show).collect();
            writeln!(f, "  {}", values.join(" | "))?;
        }
        if rows.len() > 40 {
            writeln!(f, "  …")?;
        }
        Ok(())
    }
}

/// A value as text when it is printable text, else in hex.
fn show(v: &Value) -> String {
    match v {
        None => "NULL".into(),
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
            _ => format!("\\x{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
        },
    }
}
