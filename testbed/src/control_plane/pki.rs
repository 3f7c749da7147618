//! The control plane's keys and certificates, made fresh for every control plane:
//! a CA, the API server's serving certificate (its IP and the in-cluster names as
//! SANs), the ServiceAccount signing key, and random bearer tokens. rcgen does
//! the X.509; the CA's private key never leaves memory.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use zeroize::Zeroizing;

use super::{Error, Result};

pub(super) struct Pki {
    pub ca_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: Zeroizing<String>,
    pub sa_key_pem: Zeroizing<String>,
    pub sa_public_pem: String,
}

fn x509(e: rcgen::Error) -> Error {
    Error::Other(format!("generating the control plane's certificates: {e}"))
}

impl Pki {
    pub fn generate(address: IpAddr) -> Result<Self> {
        let ca_key = KeyPair::generate().map_err(x509)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(x509)?;
        ca.distinguished_name
            .push(DnType::CommonName, "wgmesh test control plane CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).map_err(x509)?;
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate().map_err(x509)?;
        let mut serving = CertificateParams::new(vec![
            address.to_string(),
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
        ])
        .map_err(x509)?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer).map_err(x509)?;

        let sa_key = KeyPair::generate().map_err(x509)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: Zeroizing::new(serving_key.serialize_pem()),
            sa_key_pem: Zeroizing::new(sa_key.serialize_pem()),
            sa_public_pem: sa_key.public_key_pem(),
        })
    }
}

/// 32 random bytes as hex: a static bearer token.
pub(super) fn random_token() -> Result<Zeroizing<String>> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut bytes[..])
        .map_err(|e| Error::Other(format!("no randomness for a token: {e}")))?;
    Ok(Zeroizing::new(hex::encode(&bytes[..])))
}
