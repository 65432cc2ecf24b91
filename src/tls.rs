//! TLS to PostgreSQL and Redis, with rustls (no OpenSSL, no libpq).
//!
//! Managed PostgreSQL and Redis — where a fleet's backing services usually live — require TLS.
//!
//! # PostgreSQL
//! diesel-async's `AsyncPgConnection::establish` connects without TLS, and tokio-postgres knows
//! only `sslmode=disable|prefer|require`. So [`PgConnector`] reads `sslmode` out of `DATABASE_URL`
//! itself, with libpq's meanings, and connects with tokio-postgres and a rustls connector made for
//! that mode, handing the connection to diesel-async
//! (`AsyncPgConnection::try_from_client_and_connection`). Every place that opens a PostgreSQL
//! connection — the pool, the change listener, migrations — goes through it.
//!
//! | `sslmode`       | encrypted             | certificate checked                          |
//! |-----------------|-----------------------|----------------------------------------------|
//! | `disable`       | no                    | —                                            |
//! | `prefer` (default, as libpq) | if the server offers it | no                          |
//! | `require`       | yes                   | no                                           |
//! | `verify-ca`     | yes                   | chain against the CA                         |
//! | `verify-full`   | yes                   | chain against the CA, and the host name      |
//!
//! The CA is `DATABASE_CA_FILE` (PEM) when set, otherwise the system's trust store
//! (rustls-native-certs, which redis-rs's rustls support uses too).
//!
//! # Redis
//! redis-rs does the TLS itself for `rediss://` URLs; [`redis_tls_certificates`] gives it the CA
//! (`REDIS_CA_FILE`) and the optional client certificate and key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres::config::SslMode as WireSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The crypto provider every TLS connection uses (ring: small, and no C toolchain beyond a
/// compiler). Installed as the process default too, for redis-rs, which asks for that one.
fn provider() -> Arc<CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Installs [`provider`] as the process default: for clients that ask rustls for that one (the
/// span exporter's HTTP client).
pub fn install_provider() {
    provider();
}

/// What a PEM file holds, and so what [`PemFile::read`] checks it for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemKind {
    /// One or more certificates (a CA bundle, or a client certificate chain).
    Certificates,
    /// One private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// A PEM file read (and checked) at start-up. Its `Debug` shows only the path: a private key
/// must not end up in a log line that prints the settings.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemFile").field("path", &self.path).finish()
    }
}

impl PemFile {
    /// Reads `path` and checks that it holds what `kind` says; the error says what is wrong.
    pub fn read(path: &Path, kind: PemKind) -> Result<Self, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
        let file = PemFile {
            path: path.to_owned(),
            pem,
        };
        match kind {
            PemKind::Certificates => {
                file.certificates()?;
            }
            PemKind::PrivateKey => {
                PrivateKeyDer::from_pem_slice(&file.pem)
                    .map_err(|e| format!("no PEM private key in it ({e})"))?;
            }
        }
        Ok(file)
    }

    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_slice_iter(&self.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not valid PEM ({e})"))?;
        if certs.is_empty() {
            return Err("no PEM certificate in it".to_owned());
        }
        Ok(certs)
    }
}

/// The certificates redis-rs needs for `rediss://` beyond its defaults: `None` when neither a CA
/// nor a client certificate is set (it then uses the system's trust store).
pub fn redis_tls_certificates(
    ca: Option<&PemFile>,
    client: Option<&(PemFile, PemFile)>,
) -> Option<redis::TlsCertificates> {
    if ca.is_none() && client.is_none() {
        return None;
    }
    // redis-rs asks rustls for the process's default provider.
    provider();
    Some(redis::TlsCertificates {
        client_tls: client.map(|(cert, key)| redis::ClientTlsConfig {
            client_cert: cert.pem.clone(),
            client_key: key.pem.clone(),
        }),
        root_cert: ca.map(|ca| ca.pem.clone()),
    })
}

/// libpq's `sslmode` values (tokio-postgres knows only the first three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const EXPECTED: &'static str =
        "a URL like postgres://user@host:5432/dbname, with sslmode (if any) one of disable, \
         prefer, require, verify-ca, verify-full";

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Splits `sslmode` out of a PostgreSQL URL: the mode (libpq's default, `prefer`, when the
    /// URL has none) and the URL without it, for tokio-postgres. `None` for an unknown mode.
    pub fn split_url(url: &str) -> Option<(SslMode, String)> {
        let Some((base, query)) = url.split_once('?') else {
            return Some((SslMode::Prefer, url.to_owned()));
        };
        let mut mode = SslMode::Prefer;
        let mut rest = Vec::new();
        for param in query.split('&').filter(|p| !p.is_empty()) {
            match param.split_once('=') {
                Some(("sslmode", value)) => mode = SslMode::parse(value)?,
                _ => rest.push(param),
            }
        }
        let url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        Some((mode, url))
    }
}

/// Opens PostgreSQL connections as `DATABASE_URL` (its `sslmode`) and `DATABASE_CA_FILE` say.
/// Cheap to clone: one per pool, listener and migration run.
#[derive(Clone)]
pub struct PgConnector {
    config: tokio_postgres::Config,
    mode: SslMode,
    tls: MakeRustlsConnect,
}

impl fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio_postgres::Config's Debug redacts the password.
        f.debug_struct("PgConnector")
            .field("config", &self.config)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl PgConnector {
    /// Checks the URL and prepares the TLS set-up; connects nothing.
    pub fn new(database_url: &str, ca: Option<&PemFile>) -> Result<Self, String> {
        let (mode, url) = SslMode::split_url(database_url)
            .ok_or_else(|| format!("DATABASE_URL: {}", SslMode::EXPECTED))?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("DATABASE_URL is not usable: {e}"))?;
        config.ssl_mode(match mode {
            SslMode::Disable => WireSslMode::Disable,
            SslMode::Prefer => WireSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireSslMode::Require,
        });
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            // libpq checks nothing in these modes: encryption against a passive listener only.
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                Arc::new(NoVerification(provider.clone()))
            }
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = root_store(ca, "DATABASE_CA_FILE")?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("DATABASE_CA_FILE: {e}"))?;
                if mode == SslMode::VerifyCa {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                }
            }
        };
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(PgConnector {
            config,
            mode,
            tls: MakeRustlsConnect::new(tls),
        })
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// Connects (with TLS as `sslmode` asks) and hands the connection to diesel-async, whose task
    /// drives it on the current tokio runtime.
    pub async fn connect(&self) -> Result<AsyncPgConnection, PgConnectError> {
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(PgConnectError::Connect)?;
        AsyncPgConnection::try_from_client_and_connection(client, connection)
            .await
            .map_err(PgConnectError::Setup)
    }

    /// Connects as [`PgConnector::connect`] does, for a transaction-mode pooler: diesel-async's
    /// set-up of the connection (two `SET`s, each a statement prepared and run in separate round
    /// trips) runs inside one transaction, so that it stays on one server connection.
    pub async fn connect_in_transaction(&self) -> Result<AsyncPgConnection, PgConnectError> {
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(PgConnectError::Connect)?;
        // Driven here: diesel-async is given only the client. The task ends when the client is
        // dropped, or the connection fails.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("a PostgreSQL connection ended: {e}");
            }
        });
        client
            .batch_execute("BEGIN")
            .await
            .map_err(PgConnectError::Connect)?;
        let mut conn = AsyncPgConnection::try_from(client)
            .await
            .map_err(PgConnectError::Setup)?;
        diesel_async::SimpleAsyncConnection::batch_execute(&mut conn, "COMMIT")
            .await
            .map_err(|e| PgConnectError::Setup(ConnectionError::CouldntSetupConfiguration(e)))?;
        Ok(conn)
    }

    /// Asks the server, over a connection of its own, to cancel what the connection of `token`
    /// is running (as a query's own timeout does on the server): the query ends with an error
    /// and its connection stays usable. Transaction-mode poolers pass cancel requests on.
    pub async fn cancel(&self, token: &tokio_postgres::CancelToken) -> Result<(), String> {
        token
            .cancel_query(self.tls.clone())
            .await
            .map_err(|e| describe(&e))
    }
}

/// Why [`PgConnector::connect`] made no connection. The driver's error is kept whole: what it
/// says about the server (refused, full, shutting down, our credentials rejected) is read from
/// its SQLSTATE, not from its text (see `crate::actors::db::failure`).
#[derive(Debug)]
pub enum PgConnectError {
    /// tokio-postgres could not connect: the network, TLS, or the server's answer.
    Connect(tokio_postgres::Error),
    /// Connected, but diesel-async's set-up of the connection failed.
    Setup(ConnectionError),
}

impl PgConnectError {
    /// The server's certificate failed the check `sslmode` asks for: retrying cannot help.
    pub fn certificate_rejected(&self) -> bool {
        matches!(self, PgConnectError::Connect(e) if certificate_rejected(e))
    }
}

impl fmt::Display for PgConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgConnectError::Connect(e) if certificate_rejected(e) => {
                write!(
                    f,
                    "the server's TLS certificate was rejected: {}",
                    describe(e)
                )
            }
            PgConnectError::Connect(e) => f.write_str(&describe(e)),
            PgConnectError::Setup(e) => write!(f, "setting up the connection failed: {e}"),
        }
    }
}

impl std::error::Error for PgConnectError {}

impl From<PgConnectError> for ConnectionError {
    fn from(e: PgConnectError) -> Self {
        match e {
            PgConnectError::Setup(e) => e,
            other => ConnectionError::BadConnection(other.to_string()),
        }
    }
}

/// Finds rustls's certificate error behind tokio-postgres's (it comes wrapped in an io::Error).
fn certificate_rejected(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let rustls_error = cause.downcast_ref::<rustls::Error>().or_else(|| {
            cause
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if matches!(rustls_error, Some(rustls::Error::InvalidCertificate(_))) {
            return true;
        }
        source = cause.source();
    }
    false
}

/// tokio-postgres's `Display` of a TLS failure is only "error performing TLS handshake"; the
/// cause (an unknown issuer, a name mismatch) is what the operator needs.
fn describe(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// The CA file's certificates, or the system's trust store when none is set.
fn root_store(ca: Option<&PemFile>, var: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(ca) => {
            for cert in ca.certificates().map_err(|e| format!("{var}: {e}"))? {
                roots.add(cert).map_err(|e| {
                    format!(
                        "{var}: {} holds an unusable certificate: {e}",
                        ca.path.display()
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "no CA certificates in the system's trust store ({:?}); set {var}",
                    found.errors
                ));
            }
        }
    }
    Ok(roots)
}

/// `sslmode=prefer|require`: encrypt, check no certificate (libpq's meaning). The handshake's
/// signatures are still verified, so the connection is at least with whoever holds the key of
/// the certificate it showed.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to the CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_taken_out_of_the_url() {
        let split = |url| SslMode::split_url(url);
        assert_eq!(
            split("postgres://u:p@h/db"),
            Some((SslMode::Prefer, "postgres://u:p@h/db".to_owned()))
        );
        assert_eq!(
            split("postgres://h/db?sslmode=verify-full"),
            Some((SslMode::VerifyFull, "postgres://h/db".to_owned()))
        );
        assert_eq!(
            split("postgres://h/db?connect_timeout=3&sslmode=require&application_name=x"),
            Some((
                SslMode::Require,
                "postgres://h/db?connect_timeout=3&application_name=x".to_owned()
            ))
        );
        assert_eq!(split("postgres://h/db?sslmode=allow-ish"), None);
    }

    #[test]
    fn every_mode_builds_without_a_ca_file_except_where_roots_are_needed() {
        for mode in ["disable", "prefer", "require"] {
            let url = format!("postgres://u:secret@127.0.0.1/db?sslmode={mode}");
            let connector = PgConnector::new(&url, None).expect(mode);
            assert!(
                !format!("{connector:?}").contains("secret"),
                "{connector:?}"
            );
        }
    }
}
