//! Hot statements prepared once per connection.
//!
//! diesel never caches a `sql_query` (it marks every one unsafe to cache),
//! so PostgreSQL parses and plans the batch statements on every round —
//! over a millisecond for the claim. [`cached`] is the same raw SQL with
//! `$n` placeholders, as a query diesel caches by its text: prepared on a
//! connection's first use, then only bound and executed.

use std::marker::PhantomData;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::QueryResult;

/// One bound value and its SQL type.
trait Arg: Send + Sync {
    fn push<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()>;
}

struct Typed<ST, T>(T, PhantomData<fn() -> ST>);

impl<ST, T> Arg for Typed<ST, T>
where
    Pg: HasSqlType<ST>,
    T: ToSql<ST, Pg> + Send + Sync,
{
    fn push<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_bind_param::<ST, T>(&self.0)
    }
}

/// A raw SQL statement that diesel prepares once per connection.
pub struct Cached<'a> {
    sql: &'static str,
    args: Vec<Box<dyn Arg + 'a>>,
}

/// `sql`, with `$1`, `$2`, … bound in order by [`Cached::bind`].
pub fn cached<'a>(sql: &'static str) -> Cached<'a> {
    Cached {
        sql,
        args: Vec::new(),
    }
}

impl<'a> Cached<'a> {
    pub fn bind<ST, T>(mut self, value: T) -> Self
    where
        Pg: HasSqlType<ST>,
        T: ToSql<ST, Pg> + Send + Sync + 'a,
        ST: 'a,
    {
        self.args.push(Box::new(Typed::<ST, T>(value, PhantomData)));
        self
    }
}

impl QueryId for Cached<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Cached<'_> {
    type SqlType = Untyped;
}

impl QueryFragment<Pg> for Cached<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Each `$n` becomes a placeholder of diesel's own numbering.
        let mut rest = self.sql;
        while let Some(at) = rest.find('$') {
            let digits = rest[at + 1..]
                .bytes()
                .take_while(u8::is_ascii_digit)
                .count();
            if digits == 0 {
                out.push_sql(&rest[..=at]);
                rest = &rest[at + 1..];
                continue;
            }
            out.push_sql(&rest[..at]);
            let n: usize = rest[at + 1..at + 1 + digits].parse().unwrap_or(0);
            let arg = n
                .checked_sub(1)
                .and_then(|i| self.args.get(i))
                .ok_or_else(|| {
                    diesel::result::Error::QueryBuilderError(
                        format!("placeholder ${n} has no bound value").into(),
                    )
                })?;
            arg.push(&mut out)?;
            rest = &rest[at + 1 + digits..];
        }
        out.push_sql(rest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::sql_types::{Int4, Text};

    #[test]
    fn placeholders_become_binds_in_order_and_repeat() {
        let q = cached("SELECT $2::text, $1 + $1, '$'")
            .bind::<Int4, _>(7)
            .bind::<Text, _>("x");
        let sql = diesel::debug_query::<Pg, _>(&q).to_string();
        assert!(sql.starts_with("SELECT $1::text, $2 + $3, '$'"), "{sql}");
        assert!(sql.contains("[\"x\", 7, 7]"), "{sql}");
        let missing = cached("SELECT $3").bind::<Int4, _>(1);
        let mut qb = diesel::pg::PgQueryBuilder::default();
        assert!(
            missing.to_sql(&mut qb, &Pg).is_err(),
            "an unbound placeholder"
        );
    }
}
