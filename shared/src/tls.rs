//! TLS of the PostgreSQL and Redis stores: a rustls client that trusts the CA bundle named by
//! `store.tls_ca_file` (PEM), or the system's roots without one. The certificate is always
//! verified, and the host name in the URL must be on it. RabbitMQ's `amqps://` uses lapin's
//! own rustls, with the same kind of file (`transport.tls_ca_file`).
//!
//! The tree links both of rustls's crypto providers (lapin and the AWS SDK ask for different
//! ones), so a provider is always named here: ring.

/// Installs ring as the process's rustls provider unless one is installed already, for
/// clients that build their TLS config from the process default (redis).
#[cfg(feature = "redis")]
pub(crate) fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client config trusting `ca_pem` (the contents of the file `key` names), or the system's
/// roots when there is none.
#[cfg(feature = "postgres")]
pub(crate) fn client_config(
    key: &str,
    ca_pem: Option<&str>,
) -> crate::Result<rustls::ClientConfig> {
    use rustls::{
        pki_types::{pem::PemObject, CertificateDer},
        ClientConfig, RootCertStore,
    };

    use crate::Error;

    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| {
                    Error::Config(format!("key `{key}`: not a PEM certificate bundle: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    Error::Config(format!("key `{key}`: a certificate rustls refuses: {e}"))
                })?;
            }
        }
        None => {
            // Unreadable entries of the system store are skipped, as every TLS client does.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("key `{key}`: TLS set-up: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// tokio-postgres's TLS through tokio-rustls.
#[cfg(feature = "postgres")]
pub(crate) mod postgres {
    use std::{
        future::Future,
        io,
        pin::Pin,
        sync::Arc,
        task::{Context, Poll},
    };

    use rustls::{pki_types::ServerName, ClientConfig};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

    /// Makes one TLS connector per connection, named after the URL's host.
    #[derive(Clone)]
    pub(crate) struct MakeRustls(pub(crate) Arc<ClientConfig>);

    impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for MakeRustls {
        type Stream = Stream<S>;
        type TlsConnect = Connect;
        type Error = io::Error;

        fn make_tls_connect(&mut self, host: &str) -> io::Result<Connect> {
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            Ok(Connect(self.0.clone(), name))
        }
    }

    /// The connector of one connection.
    pub(crate) struct Connect(Arc<ClientConfig>, ServerName<'static>);

    impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for Connect {
        type Stream = Stream<S>;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

        fn connect(self, stream: S) -> Self::Future {
            Box::pin(async move {
                let tls = tokio_rustls::TlsConnector::from(self.0)
                    .connect(self.1, stream)
                    .await?;
                Ok(Stream(tls))
            })
        }
    }

    /// An encrypted connection.
    pub(crate) struct Stream<S>(tokio_rustls::client::TlsStream<S>);

    impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for Stream<S> {
        fn channel_binding(&self) -> ChannelBinding {
            // SCRAM without channel binding, as libpq's default `channel_binding=prefer`
            // falls back to.
            ChannelBinding::none()
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }
}
