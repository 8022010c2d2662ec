//! Values as the server sent them, for comparing answers byte for byte.

use tokio_postgres::types::{FromSql, Type};

/// A value as the server sent it, whatever its type.
pub struct Wire(pub Option<Vec<u8>>);

impl<'a> FromSql<'a> for Wire {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Wire(Some(raw.to_vec())))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Wire(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Column names and types, then every value in binary, as tokio-postgres (the
/// extended protocol, binary results) receives them.
pub fn wire_rows(rows: &[tokio_postgres::Row]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    let c = &r.columns()[i];
                    format!("{} {} {:?}", c.name(), c.type_(), r.get::<_, Wire>(i).0)
                })
                .collect()
        })
        .collect()
}
