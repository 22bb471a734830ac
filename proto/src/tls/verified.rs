//! Certificate signatures remembered once verified, for the CONNECT frontend's client chains.
//!
//! kube-apiserver opens a new TLS connection for every dial, never resumes a session, and
//! presents the same client certificate every time: the frontend would check the same CA
//! signature over the same certificate on every handshake, an ECDSA P-256 verification of some
//! 50 µs, a quarter of the handshake's CPU. A signature check is a pure function of the
//! algorithm, the public key, the signed bytes and the signature: once it succeeded for exactly
//! these bytes it succeeds for them forever. [`chain_algorithms`] wraps every algorithm so that
//! it remembers the exact inputs of the checks that succeeded and answers a repeat without the
//! arithmetic.
//!
//! Nothing else changes in what webpki checks on every handshake: it parses the chain, builds
//! a path to an anchor of the current CA bundle, checks every certificate's validity period
//! against the time of the handshake, key usages, name constraints and path length, exactly
//! as before. A failed check is never remembered, so a forged or altered certificate is
//! checked (and refused) in full every time. Only chain signatures go through here: the
//! handshake's own signature (CertificateVerify), which proves that the client holds the
//! certificate's key, covers a fresh transcript and is verified in full on every handshake.
//!
//! The memory is small and bounded: when it is full it starts over, so inputs chosen to fill
//! it (a client can make the server check signatures under keys of its own intermediates)
//! cost only the saving, never memory.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex, PoisonError};

use rustls_pki_types::{AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm};

/// Checks remembered at most; a client certificate chain needs one per certificate.
const CAPACITY: usize = 64;

/// The inputs of signature checks that succeeded.
#[derive(Debug, Default)]
pub(crate) struct Memory(Mutex<HashSet<Box<[u8]>>>);

impl Memory {
    fn knows(&self, key: &[u8]) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    fn remember(&self, key: Box<[u8]>) {
        let mut known = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= CAPACITY {
            known.clear();
        }
        known.insert(key);
    }
}

/// A signature verification algorithm that remembers the checks that succeeded.
#[derive(Debug)]
pub(crate) struct Remembering {
    /// Tells the wrapped algorithms apart in the memory's keys.
    index: usize,
    inner: &'static dyn SignatureVerificationAlgorithm,
    memory: &'static Memory,
}

impl Remembering {
    /// The exact inputs of a check, each length-prefixed so that no two inputs share a key.
    fn key(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> Box<[u8]> {
        let mut key = Vec::with_capacity(
            size_of::<usize>() + 3 * 4 + public_key.len() + message.len() + signature.len(),
        );
        key.extend_from_slice(&self.index.to_be_bytes());
        for part in [public_key, message, signature] {
            // Certificates are far below 4 GiB; a longer part only costs the memory its use.
            let Ok(len) = u32::try_from(part.len()) else {
                return Box::default();
            };
            key.extend_from_slice(&len.to_be_bytes());
            key.extend_from_slice(part);
        }
        key.into_boxed_slice()
    }
}

impl SignatureVerificationAlgorithm for Remembering {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        let key = self.key(public_key, message, signature);
        if key.is_empty() {
            return self.inner.verify_signature(public_key, message, signature);
        }
        if self.memory.knows(&key) {
            return Ok(());
        }
        self.inner
            .verify_signature(public_key, message, signature)?;
        self.memory.remember(key);
        Ok(())
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.public_key_alg_id()
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.signature_alg_id()
    }

    fn fips(&self) -> bool {
        self.inner.fips()
    }
}

static MEMORY: LazyLock<Memory> = LazyLock::new(Memory::default);

static REMEMBERING: LazyLock<Vec<Remembering>> = LazyLock::new(|| {
    super::ring_provider()
        .signature_verification_algorithms
        .all
        .iter()
        .enumerate()
        .map(|(index, inner)| Remembering {
            index,
            inner: *inner,
            memory: &MEMORY,
        })
        .collect()
});

static CHAIN_ALGORITHMS: LazyLock<Vec<&'static dyn SignatureVerificationAlgorithm>> =
    LazyLock::new(|| {
        REMEMBERING
            .iter()
            .map(|algorithm| algorithm as &'static dyn SignatureVerificationAlgorithm)
            .collect()
    });

/// The provider's algorithms for certificate chains, each remembering the checks that
/// succeeded (one memory for the process: what it holds are facts about bytes, true for any
/// verifier).
pub(crate) fn chain_algorithms() -> &'static [&'static dyn SignatureVerificationAlgorithm] {
    CHAIN_ALGORITHMS.as_slice()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Accepts the signature `b"good"` and counts its calls.
    #[derive(Debug)]
    struct Counting(AtomicUsize);

    impl SignatureVerificationAlgorithm for Counting {
        fn verify_signature(&self, _: &[u8], _: &[u8], sig: &[u8]) -> Result<(), InvalidSignature> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if sig == b"good" {
                Ok(())
            } else {
                Err(InvalidSignature)
            }
        }

        fn public_key_alg_id(&self) -> AlgorithmIdentifier {
            rustls_pki_types::alg_id::ECDSA_P256
        }

        fn signature_alg_id(&self) -> AlgorithmIdentifier {
            rustls_pki_types::alg_id::ECDSA_SHA256
        }
    }

    fn remembering() -> (&'static Counting, Remembering) {
        let counting: &'static Counting = Box::leak(Box::new(Counting(AtomicUsize::new(0))));
        let memory: &'static Memory = Box::leak(Box::default());
        let algorithm = Remembering {
            index: 0,
            inner: counting,
            memory,
        };
        (counting, algorithm)
    }

    #[test]
    fn a_repeated_check_that_succeeded_is_answered_from_memory() {
        let (inner, algorithm) = remembering();
        assert!(algorithm.verify_signature(b"key", b"cert", b"good").is_ok());
        assert!(algorithm.verify_signature(b"key", b"cert", b"good").is_ok());
        assert_eq!(inner.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn failures_are_never_remembered() {
        let (inner, algorithm) = remembering();
        assert!(algorithm.verify_signature(b"key", b"cert", b"bad").is_err());
        assert!(algorithm.verify_signature(b"key", b"cert", b"bad").is_err());
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn any_other_byte_is_checked_in_full() {
        let (inner, algorithm) = remembering();
        assert!(algorithm.verify_signature(b"key", b"cert", b"good").is_ok());
        // The same bytes split differently between key, message and signature are other
        // inputs.
        assert!(algorithm.verify_signature(b"keyc", b"ert", b"good").is_ok());
        assert!(
            algorithm
                .verify_signature(b"key", b"cert!", b"good")
                .is_ok()
        );
        assert!(algorithm.verify_signature(b"key", b"cert", b"goo").is_err());
        assert_eq!(inner.0.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn the_memory_stays_bounded() {
        let (inner, algorithm) = remembering();
        for i in 0..3 * CAPACITY {
            let message = i.to_be_bytes();
            assert!(
                algorithm
                    .verify_signature(b"key", &message, b"good")
                    .is_ok()
            );
        }
        assert!(algorithm.memory.0.lock().unwrap().len() <= CAPACITY);
        assert_eq!(inner.0.load(Ordering::SeqCst), 3 * CAPACITY);
    }

    #[test]
    fn every_algorithm_of_the_provider_is_wrapped_in_order() {
        let plain = super::super::ring_provider()
            .signature_verification_algorithms
            .all;
        let wrapped = chain_algorithms();
        assert_eq!(plain.len(), wrapped.len());
        for (plain, wrapped) in plain.iter().zip(wrapped) {
            assert_eq!(plain.public_key_alg_id(), wrapped.public_key_alg_id());
            assert_eq!(plain.signature_alg_id(), wrapped.signature_alg_id());
        }
    }
}
