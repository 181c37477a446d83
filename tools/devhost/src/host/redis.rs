//! `fermyon:spin/redis` (outbound Redis): a real server, or the in-process broker in
//! `--redis memory` mode. The address must be allowed by `allowed_outbound_hosts`.

use std::sync::Arc;

use redis::AsyncCommands;
use wasmtime::component::Resource;

use super::bindings::fermyon::spin2_0_0::redis::{Error, Host, HostConnection, RedisParameter, RedisResult};
use super::HostState;
use crate::broker::Broker;

pub enum RedisConnection {
    Memory(Arc<Broker>),
    Real(RealRedis),
}

/// An open connection to a Redis server, shared through devhost's per-address cache.
#[derive(Clone)]
pub struct RealRedis {
    address: String,
    conn: redis::aio::MultiplexedConnection,
    app: Arc<crate::app::App>,
}

impl RealRedis {
    /// Runs one command. Every command goes through here so that a connection-level failure
    /// (Redis went away) makes the cache forget the connection and the next `open` reconnect.
    async fn run<T, F, Fut>(self, command: F) -> Result<T, Error>
    where
        F: FnOnce(redis::aio::MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match command(self.conn.clone()).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                    self.app.services.forget_redis(&self.address).await;
                }
                Err(other(e))
            }
        }
    }
}

fn other(e: impl std::fmt::Display) -> Error {
    Error::Other(e.to_string())
}

impl HostState {
    fn redis(&mut self, conn: &Resource<RedisConnection>) -> Result<&RedisConnection, Error> {
        self.table.get(conn).map_err(other)
    }
}

fn to_result(v: redis::Value, out: &mut Vec<RedisResult>) -> Result<(), Error> {
    match v {
        redis::Value::Nil => out.push(RedisResult::Nil),
        redis::Value::Int(i) => out.push(RedisResult::Int64(i)),
        redis::Value::BulkString(b) => out.push(RedisResult::Binary(b)),
        redis::Value::SimpleString(s) => out.push(RedisResult::Status(s)),
        redis::Value::Okay => out.push(RedisResult::Status("OK".into())),
        redis::Value::Array(items) | redis::Value::Set(items) => {
            for item in items {
                to_result(item, out)?;
            }
        }
        other => return Err(Error::Other(format!("unsupported redis reply {other:?}"))),
    }
    Ok(())
}

impl Host for HostState {}

impl HostConnection for HostState {
    async fn open(&mut self, address: String) -> Result<Resource<RedisConnection>, Error> {
        if !self.ctx.allowed_hosts.allows_url(&address) {
            tracing::warn!(component = %self.ctx.id, "outbound redis to {} denied by allowed_outbound_hosts", redact_url(&address));
            return Err(Error::InvalidAddress);
        }
        let conn = match &self.app.services.broker {
            Some(broker) => RedisConnection::Memory(broker.clone()),
            None => {
                let conn = self.app.services.redis_connection(&address).await.map_err(|e| {
                    tracing::warn!(component = %self.ctx.id, "redis {}: {e}", redact_url(&address));
                    other(e)
                })?;
                RedisConnection::Real(RealRedis { address, conn, app: self.app.clone() })
            }
        };
        self.table.push(conn).map_err(other)
    }

    async fn publish(
        &mut self,
        conn: Resource<RedisConnection>,
        channel: String,
        payload: Vec<u8>,
    ) -> Result<(), Error> {
        match self.redis(&conn)? {
            RedisConnection::Memory(b) => {
                b.publish(&channel, payload);
                Ok(())
            }
            RedisConnection::Real(r) => {
                r.clone().run(|mut c| async move { c.publish::<_, _, i64>(channel, payload).await.map(|_| ()) }).await
            }
        }
    }

    async fn get(&mut self, conn: Resource<RedisConnection>, key: String) -> Result<Option<Vec<u8>>, Error> {
        match self.redis(&conn)? {
            RedisConnection::Memory(b) => Ok(b.get(&key)),
            RedisConnection::Real(r) => r.clone().run(|mut c| async move { c.get(key).await }).await,
        }
    }

    async fn set(&mut self, conn: Resource<RedisConnection>, key: String, value: Vec<u8>) -> Result<(), Error> {
        match self.redis(&conn)? {
            RedisConnection::Memory(b) => {
                b.set(&key, value);
                Ok(())
            }
            RedisConnection::Real(r) => r.clone().run(|mut c| async move { c.set(key, value).await }).await,
        }
    }

    async fn incr(&mut self, conn: Resource<RedisConnection>, key: String) -> Result<i64, Error> {
        match self.redis(&conn)? {
            RedisConnection::Memory(b) => b.incr(&key).map_err(|_| Error::TypeError),
            RedisConnection::Real(r) => r.clone().run(|mut c| async move { c.incr(key, 1).await }).await,
        }
    }

    async fn del(&mut self, conn: Resource<RedisConnection>, keys: Vec<String>) -> Result<u32, Error> {
        match self.redis(&conn)? {
            RedisConnection::Memory(b) => Ok(b.del(&keys)),
            RedisConnection::Real(r) => r.clone().run(|mut c| async move { c.del(keys).await }).await,
        }
    }

    async fn sadd(&mut self, conn: Resource<RedisConnection>, key: String, values: Vec<String>) -> Result<u32, Error> {
        match self.redis(&conn)? {
            RedisConnection::Memory(b) => Ok(b.sadd(&key, &values)),
            RedisConnection::Real(r) => r.clone().run(|mut c| async move { c.sadd(key, values).await }).await,
        }
    }

    async fn smembers(&mut self, conn: Resource<RedisConnection>, key: String) -> Result<Vec<String>, Error> {
        match self.redis(&conn)? {
            RedisConnection::Memory(b) => Ok(b.smembers(&key)),
            RedisConnection::Real(r) => r.clone().run(|mut c| async move { c.smembers(key).await }).await,
        }
    }

    async fn srem(&mut self, conn: Resource<RedisConnection>, key: String, values: Vec<String>) -> Result<u32, Error> {
        match self.redis(&conn)? {
            RedisConnection::Memory(b) => Ok(b.srem(&key, &values)),
            RedisConnection::Real(r) => r.clone().run(|mut c| async move { c.srem(key, values).await }).await,
        }
    }

    async fn execute(
        &mut self,
        conn: Resource<RedisConnection>,
        command: String,
        arguments: Vec<RedisParameter>,
    ) -> Result<Vec<RedisResult>, Error> {
        match self.redis(&conn)? {
            RedisConnection::Memory(_) => {
                Err(Error::Other(format!("`execute {command}` is not available with devhost's in-memory redis")))
            }
            RedisConnection::Real(r) => {
                let mut cmd = redis::cmd(&command);
                for a in arguments {
                    match a {
                        RedisParameter::Int64(i) => cmd.arg(i),
                        RedisParameter::Binary(b) => cmd.arg(b),
                    };
                }
                let value: redis::Value = r.clone().run(|mut c| async move { cmd.query_async(&mut c).await }).await?;
                let mut out = Vec::new();
                to_result(value, &mut out)?;
                Ok(out)
            }
        }
    }

    async fn drop(&mut self, conn: Resource<RedisConnection>) -> wasmtime::Result<()> {
        self.table.delete(conn)?;
        Ok(())
    }
}

/// A URL with any password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<invalid url>".into(),
    }
}
