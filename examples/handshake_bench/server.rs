//! The example HTTPS server (examples/tls_server's accept loop, TLS settings and HTTP service)
//! running in this process on a runtime of its own, serving one certified key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_hsm::resolver::ServerCertResolver;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cpu::ThreadCpu;
use crate::serve::{self, TlsSettings};

/// A running example server.
pub(crate) struct RunningServer {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// CPU time of its runtime's threads (handshakes, signing, HTTP).
    pub(crate) cpu: Arc<ThreadCpu>,
    runtime: Runtime,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// Starts the example server on 127.0.0.1 serving `certified` for any name, on a
    /// multi-threaded runtime with the default worker count (one per CPU), as the example runs.
    pub(crate) fn start(certified: Arc<CertifiedKey>) -> anyhow::Result<Self> {
        let mut resolver = ServerCertResolver::new();
        resolver.add(None, certified);
        let resolver: Arc<dyn ResolvesServerCert> = Arc::new(resolver);
        let tls = Arc::new(TlsSettings::new(
            resolver,
            WebPkiClientVerifier::no_client_auth(),
        ));

        let cpu = Arc::new(ThreadCpu::default());
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .enable_all()
            .thread_name("bench-server");
        let runtime = cpu
            .hooks(&mut builder)
            .build()
            .context("starting the server's runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("binding the server's listener")?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
            "benchmark point done"
        };
        let task = runtime.spawn(serve::serve(
            listener,
            shutdown,
            tls,
            Duration::from_secs(2),
        ));
        Ok(Self {
            addr,
            cpu,
            runtime,
            stop,
            task,
        })
    }

    /// Stops accepting, lets open connections finish and stops the runtime.
    pub(crate) fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        let served = self
            .runtime
            .block_on(self.task)
            .context("the server task failed")?;
        self.runtime
            .shutdown_timeout(Duration::from_secs(2));
        served
    }
}
