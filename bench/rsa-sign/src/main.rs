//! RSA-PSS-SHA256 signatures with a 2048-bit key: rustls's aws-lc-rs provider against
//! rustls-openssl (the system libcrypto), in alternating rounds so that the host's
//! drift falls on both alike. Prints each round and the medians, in µs per signature.
use std::time::Instant;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::Signer;
use rustls::SignatureScheme;

const ROUNDS: usize = 12;
const PER_ROUND: usize = 2000;

fn signer(p: &CryptoProvider, pkcs8: &[u8]) -> Box<dyn Signer> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()));
    let key = p
        .key_provider
        .load_private_key(der)
        .expect("an RSA PKCS#8 key");
    key.choose_scheme(&[SignatureScheme::RSA_PSS_SHA256])
        .expect("RSA-PSS-SHA256")
}

/// µs per signature over `n` signatures.
fn round(s: &dyn Signer, n: usize) -> f64 {
    let msg = [7u8; 130]; // the size of a TLS 1.3 CertificateVerify input with SHA-384
    let t = Instant::now();
    for _ in 0..n {
        s.sign(&msg).expect("sign");
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: rsa-sign KEY.pk8.der");
    let pkcs8 = std::fs::read(path).expect("read the key");
    let aws = signer(&rustls::crypto::aws_lc_rs::default_provider(), &pkcs8);
    let ossl = signer(&rustls_openssl::default_provider(), &pkcs8);
    round(&*aws, 300);
    round(&*ossl, 300);
    let (mut a, mut o) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        if i % 2 == 0 {
            a.push(round(&*aws, PER_ROUND));
            o.push(round(&*ossl, PER_ROUND));
        } else {
            o.push(round(&*ossl, PER_ROUND));
            a.push(round(&*aws, PER_ROUND));
        }
    }
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("aws-lc-rs µs/signature, rounds: {}", show(&a));
    println!("OpenSSL   µs/signature, rounds: {}", show(&o));
    let (ma, mo) = (median(a), median(o));
    println!(
        "medians: aws-lc-rs {ma:.1} µs ({:.0}/s), OpenSSL {mo:.1} µs ({:.0}/s)",
        1e6 / ma,
        1e6 / mo
    );
}
