//! The two seams between `http_request` and the network: a [`Resolver`]
//! that turns a host name into addresses, and a [`Connector`] that opens a
//! byte stream to one already-vetted socket address.
//!
//! Invariant: the connector is only ever given an address that passed the
//! address policy; it must not resolve anything itself. Tests swap both for
//! in-memory fakes, so no test sends traffic anywhere.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// The future a [`Resolver`] returns.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Turns a host name into IP addresses. Called once per hop; the addresses
/// it returns are checked and then connected to directly.
pub trait Resolver: Send + Sync {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a>;
}

/// Resolves through the system resolver (`tokio::net::lookup_host`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioResolver;

impl Resolver for TokioResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// A bidirectional byte stream a [`Connector`] returns.
pub trait ConnectionIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ConnectionIo for T {}

/// A boxed [`ConnectionIo`].
pub type BoxedStream = Box<dyn ConnectionIo>;

/// The future a [`Connector`] returns.
pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send + 'a>>;

/// Where to connect: a vetted address, and the host name the URL used (for
/// TLS server names and logs; never to be resolved again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTarget {
    pub addr: SocketAddr,
    pub host: String,
}

/// Opens a stream to a vetted address.
pub trait Connector: Send + Sync {
    fn connect<'a>(&'a self, target: &'a ConnectTarget) -> ConnectFuture<'a>;
}

/// Connects with a plain TCP socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect<'a>(&'a self, target: &'a ConnectTarget) -> ConnectFuture<'a> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(target.addr).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxedStream)
        })
    }
}
