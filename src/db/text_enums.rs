//! How the closed vocabularies of [`crate::ids`] are stored: as their wire
//! words in `text` columns. A word the enum does not know, read back, is
//! a deserialization error (a row written by a newer broker, or by hand),
//! never a silent default.

use std::io::Write;

use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::Text;

use crate::ids::{Priority, Role, Status};

macro_rules! text_enum {
    ($($ty:ident),+) => {$(
        impl ToSql<Text, Pg> for $ty {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                out.write_all(self.as_str().as_bytes())?;
                Ok(IsNull::No)
            }
        }

        impl FromSql<Text, Pg> for $ty {
            fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
                let word = std::str::from_utf8(value.as_bytes())?;
                $ty::parse(word).ok_or_else(|| {
                    format!(concat!("unknown ", stringify!($ty), " {:?} in the database"), word)
                        .into()
                })
            }
        }
    )+};
}

text_enum!(Role, Status, Priority);

#[cfg(test)]
mod tests {
    use diesel::sql_types::{Nullable, Text};
    use diesel::QueryableByName;
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

    use crate::ids::{connection_key, Priority, Role, Status};

    #[derive(QueryableByName)]
    struct Words {
        #[diesel(sql_type = Text)]
        role: Role,
        #[diesel(sql_type = Text)]
        status: Status,
        #[diesel(sql_type = Text)]
        priority: Priority,
    }

    #[derive(QueryableByName)]
    struct Key {
        #[diesel(sql_type = Text)]
        key: String,
    }

    /// The SQL forms against a real (embedded, throwaway) database: the
    /// wire enums survive a trip through `text` and refuse unknown words,
    /// and the SQL connection key is the Rust one.
    #[test]
    fn sql_forms_agree_with_rust() {
        let Some(cluster) = crate::db::embedded::Throwaway::start() else {
            return;
        };
        let pg = &cluster.pg;
        cluster.block_on(async {
            let conn = &mut AsyncPgConnection::establish(&pg.url()).await.unwrap();
            let words = "SELECT $1 AS role, $2 AS status, $3 AS priority";
            for i in 0..3 {
                let (role, status, priority) = (Role::ALL[i], Status::ALL[i], Priority::ALL[i]);
                let back: Words = diesel::sql_query(words)
                    .bind::<Text, _>(role)
                    .bind::<Text, _>(status)
                    .bind::<Text, _>(priority)
                    .get_result(conn)
                    .await
                    .unwrap();
                assert_eq!((back.role, back.status, back.priority), (role, status, priority));
            }
            for (bad, what) in [
                ("SELECT 'Session' AS role, 'idle' AS status, 'now' AS priority", "Role"),
                ("SELECT 'session' AS role, 'busy' AS status, 'now' AS priority", "Status"),
                ("SELECT 'session' AS role, 'idle' AS status, '' AS priority", "Priority"),
            ] {
                let err = diesel::sql_query(bad)
                    .get_result::<Words>(conn)
                    .await
                    .err()
                    .unwrap_or_else(|| panic!("{bad}: an unknown word read back"));
                assert!(err.to_string().contains(&format!("unknown {what}")), "{err}");
            }
            let key = format!(
                "SELECT {} AS key FROM (SELECT $1::text AS session_pubkey, $2::text AS session_id) p",
                crate::db::rules::connection_key("p")
            );
            for (pubkey, sid) in [(Some("ab12"), "s1"), (None, "s1"), (Some(""), "s2"), (None, "")] {
                let got: Key = diesel::sql_query(&key)
                    .bind::<Nullable<Text>, _>(pubkey)
                    .bind::<Text, _>(sid)
                    .get_result(conn)
                    .await
                    .unwrap();
                assert_eq!(got.key, connection_key(pubkey, sid), "{pubkey:?} {sid:?}");
            }
        });
    }
}
