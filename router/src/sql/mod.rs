//! Reading SQL with the real Postgres grammar (`pg_query`) to learn what the
//! router needs: the kind of each statement, the tables it touches, and where its
//! tenant key comes from.
//!
//! Analysis is done once per distinct statement shape — the text with its
//! constants and comments taken out ([`shape`]) — and cached ([`AnalysisCache`]);
//! the result holds *where* a key is (a literal, the n-th bind parameter) rather
//! than the key itself, so one cached analysis serves every execution of a prepared
//! statement, and every text that differs only in its constants. Turning it into
//! keys is [`resolve`](crate::route) work at run time.

mod analyze;
mod cache;
mod colocation;
mod key_writes;
mod lift;
mod nested_writes;
mod pooled_state;
pub mod prepare_text;
pub mod quote;
mod restriction;
pub mod roles;
pub mod shape;
#[cfg(test)]
pub(crate) mod testing;

pub use analyze::{
    analyze, Analysis, CopyFormat, CopyInfo, InsertInfo, KeyCandidates, KeyExpr, SettingChange, SqlPrepared, Statement,
    StatementKind, TxnControl,
};
pub use cache::AnalysisCache;
pub use colocation::{NotLocal, Read};
pub use key_writes::{InsertSelect, Inserted, KeyChange};
pub use lift::{statement_name, ServerForm, SimpleForm};
