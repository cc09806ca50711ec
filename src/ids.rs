//! Identifiers nobody can predict: keygate's request ids and the assertion's `jti`.
//!
//! 128 bits from rand's thread-local CSPRNG (ChaCha12, seeded and periodically reseeded from
//! the operating system): a request costs no system call. A counter, even behind a random
//! prefix, let a client that saw one id send the ids keygate would hand out next.

use rand::RngCore;

/// A fresh 128-bit random id as 32 lowercase hex characters.
pub fn random() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn ids_are_128_bit_hex_and_never_repeat() {
        let ids: Vec<String> = (0..10_000).map(|_| super::random()).collect();
        assert!(ids
            .iter()
            .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())));
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
    }
}
