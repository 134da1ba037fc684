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
