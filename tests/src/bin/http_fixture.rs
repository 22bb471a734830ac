//! `cplink-http-fixture`: a tiny HTTP server for end-to-end tests, run as a pod on a
//! simulated node. Every `GET` is answered with `200` and `hello from <name>\n`; it logs one
//! line per request to stdout, so the pod's log shows the traffic.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Answers every request with a greeting naming this server.
#[derive(Parser, Debug)]
#[command(name = "cplink-http-fixture", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "FIXTURE_LISTEN")]
    listen: SocketAddr,
    /// Name in the greeting.
    #[arg(long, env = "FIXTURE_NAME", default_value = "cplink-http-fixture")]
    name: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let name: &'static str = Box::leak(args.name.into_boxed_str());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("accept failed: {err}");
                continue;
            }
        };
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                println!("{} {} from {peer}", req.method(), req.uri());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                    "hello from {name}\n"
                )))))
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection from {peer} failed: {err}");
            }
        });
    }
}
