//! The randomized differential test's parts: a random table, random reads of
//! it, each server's answer, and the router's judged against one Postgres.

pub mod answer;
pub mod judge;
pub mod query;
pub mod table;
