//! Merkle roots over transaction ids, as in a block header.

use super::sha256d;

/// The merkle root of transaction ids given in internal byte order.
///
/// Pairs are hashed with sha256d; an odd level repeats its last hash, as Bitcoin does.
/// An empty list has no root.
pub fn merkle_root(txids: &[[u8; 32]]) -> Option<[u8; 32]> {
    let mut level: Vec<[u8; 32]> = txids.to_vec();
    if level.is_empty() {
        return None;
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| {
                let right = pair.get(1).unwrap_or(&pair[0]);
                let mut joined = [0u8; 64];
                joined[..32].copy_from_slice(&pair[0]);
                joined[32..].copy_from_slice(right);
                sha256d(&joined)
            })
            .collect();
    }
    Some(level[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_transaction_is_its_own_root() {
        assert_eq!(merkle_root(&[[7u8; 32]]), Some([7u8; 32]));
        assert_eq!(merkle_root(&[]), None);
    }
}
