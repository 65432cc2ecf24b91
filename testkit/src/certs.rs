//! Throwaway certificates for the TLS tests: a CA made for one test process, a server
//! certificate it signed (for `localhost` and `127.0.0.1`), and a client certificate it signed.
//! Nothing here is secret or kept: the keys live in the test's temp directory and die with it.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// PEM texts, as servers and clients read them from files.
#[derive(Debug, Clone)]
pub struct TestCerts {
    /// The CA certificate: what a client must trust.
    pub ca: String,
    /// Server certificate for `localhost` and `127.0.0.1`, and its key.
    pub server_cert: String,
    pub server_key: String,
    /// A client certificate (for a server that checks clients), and its key.
    pub client_cert: String,
    pub client_key: String,
}

fn fail(what: &str) -> impl FnOnce(rcgen::Error) -> String + '_ {
    move |e| format!("generating the test {what}: {e}")
}

/// A CA, the server's and a client's certificate signed by it.
pub fn generate() -> Result<TestCerts, String> {
    let ca = new_ca("singleflight test CA")?;
    let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(fail("key"))?;
        let mut params = CertificateParams::new(names).map_err(fail("certificate"))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &ca).map_err(fail("certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    // rcgen makes "127.0.0.1" an IP address SAN, so both ways of naming the host verify.
    let (server_cert, server_key) =
        leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost")?;
    let (client_cert, client_key) = leaf(vec!["singleflight-client".into()], "singleflight")?;
    Ok(TestCerts {
        ca: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    })
}

/// A CA certificate that signed nothing the test servers show: trusting only it must fail.
pub fn unrelated_ca() -> Result<String, String> {
    Ok(new_ca("an unrelated CA")?.pem())
}

fn new_ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, String> {
    let key = KeyPair::generate().map_err(fail("CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(fail("CA"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, key).map_err(fail("CA"))
}
