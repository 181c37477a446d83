//! `spin:postgres/postgres@4.0.0` over tokio-postgres.
//!
//! A guest `open` checks a connection out of the address's pool (64 per address, as Spin's
//! host keeps them: [`crate::app::Services::postgres_pool`]); it is the instance's until the
//! guest drops it, so a transaction belongs to one instance. Like Spin's, the pool resets the
//! session when the connection is next checked out, and no more: a transaction a guest left open
//! (it trapped between `BEGIN` and `COMMIT`) would stay open, as under Spin. The parameter and
//! column types this app uses are converted; any other type is a clear `bad-parameter` /
//! `value-conversion-failed` error naming it.

use std::error::Error as _;

use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use wasmtime::component::Resource;

use super::bindings::spin::postgres::postgres::{
    Column, DbDataType, DbError, DbValue, Error, Host, HostConnection, ParameterValue, QueryError, RowSet,
};
use super::HostState;

pub struct PgConnection {
    /// Back to the pool when dropped.
    client: deadpool_postgres::Object,
}

/// SQL NULL for a parameter of any type.
#[derive(Debug)]
struct Null;

impl ToSql for Null {
    fn to_sql(&self, _: &Type, _: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(IsNull::Yes)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    to_sql_checked!();
}

fn param(p: ParameterValue) -> Result<Box<dyn ToSql + Sync + Send>, Error> {
    Ok(match p {
        ParameterValue::Boolean(b) => Box::new(b),
        ParameterValue::Int8(i) => Box::new(i8::from(i)),
        ParameterValue::Int16(i) => Box::new(i),
        ParameterValue::Int32(i) => Box::new(i),
        ParameterValue::Int64(i) => Box::new(i),
        ParameterValue::Floating32(f) => Box::new(f),
        ParameterValue::Floating64(f) => Box::new(f),
        ParameterValue::Str(s) => Box::new(s),
        ParameterValue::Binary(b) => Box::new(b),
        ParameterValue::Uuid(s) => {
            Box::new(uuid::Uuid::parse_str(&s).map_err(|e| Error::BadParameter(format!("uuid: {e}")))?)
        }
        ParameterValue::Jsonb(b) => Box::new(
            serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| Error::BadParameter(format!("jsonb: {e}")))?,
        ),
        ParameterValue::Timestamp(secs) => Box::new(
            chrono::DateTime::from_timestamp(secs, 0)
                .ok_or_else(|| Error::BadParameter("timestamp out of range".into()))?,
        ),
        ParameterValue::DbNull => Box::new(Null),
        other => return Err(Error::BadParameter(format!("devhost does not support parameter type {other:?}"))),
    })
}

fn data_type(t: &Type) -> DbDataType {
    match *t {
        Type::BOOL => DbDataType::Boolean,
        Type::CHAR => DbDataType::Int8,
        Type::INT2 => DbDataType::Int16,
        Type::INT4 => DbDataType::Int32,
        Type::INT8 => DbDataType::Int64,
        Type::FLOAT4 => DbDataType::Floating32,
        Type::FLOAT8 => DbDataType::Floating64,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => DbDataType::Str,
        Type::BYTEA => DbDataType::Binary,
        Type::TIMESTAMP | Type::TIMESTAMPTZ => DbDataType::Datetime,
        Type::UUID => DbDataType::Uuid,
        Type::JSONB | Type::JSON => DbDataType::Jsonb,
        _ => DbDataType::Other(t.name().to_string()),
    }
}

fn conversion(col: &str, e: impl std::fmt::Display) -> Error {
    Error::ValueConversionFailed(format!("column {col}: {e}"))
}

fn value(row: &tokio_postgres::Row, i: usize) -> Result<DbValue, Error> {
    let col = row.columns()[i].name().to_string();
    let t = row.columns()[i].type_().clone();
    macro_rules! get {
        ($ty:ty, $variant:expr) => {
            row.try_get::<_, Option<$ty>>(i).map_err(|e| conversion(&col, e))?.map($variant).unwrap_or(DbValue::DbNull)
        };
    }
    Ok(match t {
        Type::BOOL => get!(bool, DbValue::Boolean),
        Type::CHAR => get!(i8, DbValue::Int8),
        Type::INT2 => get!(i16, DbValue::Int16),
        Type::INT4 => get!(i32, DbValue::Int32),
        Type::INT8 => get!(i64, DbValue::Int64),
        Type::FLOAT4 => get!(f32, DbValue::Floating32),
        Type::FLOAT8 => get!(f64, DbValue::Floating64),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => get!(String, DbValue::Str),
        Type::BYTEA => get!(Vec<u8>, DbValue::Binary),
        Type::UUID => get!(uuid::Uuid, |u: uuid::Uuid| DbValue::Uuid(u.to_string())),
        Type::JSONB | Type::JSON => {
            get!(serde_json::Value, |v: serde_json::Value| DbValue::Jsonb(v.to_string().into_bytes()))
        }
        Type::TIMESTAMPTZ => {
            get!(chrono::DateTime<chrono::Utc>, |d: chrono::DateTime<chrono::Utc>| datetime(d.naive_utc()))
        }
        Type::TIMESTAMP => get!(chrono::NaiveDateTime, datetime),
        other => return Err(conversion(&col, format!("devhost does not support column type {}", other.name()))),
    })
}

fn datetime(d: chrono::NaiveDateTime) -> DbValue {
    use chrono::{Datelike, Timelike};
    DbValue::Datetime((
        d.year(),
        d.month() as u8,
        d.day() as u8,
        d.hour() as u8,
        d.minute() as u8,
        d.second() as u8,
        d.nanosecond(),
    ))
}

fn query_failed(e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => Error::QueryFailed(QueryError::DbError(DbError {
            as_text: db.to_string(),
            severity: db.severity().to_string(),
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(String::from),
            extras: vec![],
        })),
        None => {
            let text = match e.source() {
                Some(src) => format!("{e}: {src}"),
                None => e.to_string(),
            };
            Error::QueryFailed(QueryError::Text(text))
        }
    }
}

impl HostState {
    fn pg(&self, conn: &Resource<PgConnection>) -> Result<&tokio_postgres::Client, Error> {
        self.table.get(conn).map(|c| &**c.client).map_err(|e| Error::Other(e.to_string()))
    }
}

fn params(values: Vec<ParameterValue>) -> Result<Vec<Box<dyn ToSql + Sync + Send>>, Error> {
    values.into_iter().map(param).collect()
}

impl Host for HostState {}

impl HostConnection for HostState {
    async fn open(&mut self, address: String) -> Result<Resource<PgConnection>, Error> {
        if !self.ctx.allowed_hosts.allows_url(&address) {
            return Err(Error::ConnectionFailed(format!(
                "address {} is not permitted",
                super::redis::redact_url(&address)
            )));
        }
        let pool = self.app.services.postgres_pool(&address).map_err(|e| Error::ConnectionFailed(format!("{e:#}")))?;
        let client = pool.get().await.map_err(|e| Error::ConnectionFailed(e.to_string()))?;
        self.table.push(PgConnection { client }).map_err(|e| Error::Other(e.to_string()))
    }

    async fn query(
        &mut self,
        conn: Resource<PgConnection>,
        statement: String,
        values: Vec<ParameterValue>,
    ) -> Result<RowSet, Error> {
        tracing::trace!(target: "devhost::postgres", component = %self.ctx.id, statement = %statement, "execute");
        let params = params(values)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let client = self.pg(&conn)?;
        let stmt = client.prepare(&statement).await.map_err(query_failed)?;
        let rows = client.query(&stmt, &refs).await.map_err(query_failed)?;
        let columns = stmt
            .columns()
            .iter()
            .map(|c| Column { name: c.name().to_string(), data_type: data_type(c.type_()) })
            .collect();
        let rows = rows
            .iter()
            .map(|row| (0..row.len()).map(|i| value(row, i)).collect::<Result<Vec<_>, _>>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RowSet { columns, rows })
    }

    async fn execute(
        &mut self,
        conn: Resource<PgConnection>,
        statement: String,
        values: Vec<ParameterValue>,
    ) -> Result<u64, Error> {
        tracing::trace!(target: "devhost::postgres", component = %self.ctx.id, statement = %statement, "execute");
        let params = params(values)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let client = self.pg(&conn)?;
        client.execute(statement.as_str(), &refs).await.map_err(query_failed)
    }

    async fn drop(&mut self, conn: Resource<PgConnection>) -> wasmtime::Result<()> {
        self.table.delete(conn)?;
        Ok(())
    }
}
