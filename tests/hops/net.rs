//! The hop tests' servers: each on a free port of 127.0.0.1.

use std::net::SocketAddr;
use tokio::net::TcpListener;

/// A listener on a free loopback port, and its address.
pub async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (listener, address)
}

/// Serves `app` on a free loopback port, in the background.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let (listener, address) = listener().await;
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}
