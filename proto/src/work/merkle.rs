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
        level = next_level(&level);
    }
    Some(level[0])
}

/// The merkle branch of the first transaction (the coinbase): the sibling hash at each
/// level, bottom up, as Stratum's `mining.notify` carries it. With it, anyone who builds
/// a coinbase can compute the block's merkle root without the other transactions.
///
/// `txids` includes the coinbase's own id first (its value does not affect the branch).
pub fn merkle_branch(txids: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let mut branch = Vec::new();
    let mut level: Vec<[u8; 32]> = txids.to_vec();
    while level.len() > 1 {
        branch.push(level[1]);
        level = next_level(&level);
    }
    branch
}

/// The merkle root from the coinbase's txid and its [`merkle_branch`].
pub fn merkle_root_from_branch(coinbase_txid: [u8; 32], branch: &[[u8; 32]]) -> [u8; 32] {
    branch
        .iter()
        .fold(coinbase_txid, |root, sibling| hash_pair(&root, sibling))
}

/// Pairs hashed with sha256d; an odd level repeats its last hash, as Bitcoin does.
fn next_level(level: &[[u8; 32]]) -> Vec<[u8; 32]> {
    level
        .chunks(2)
        .map(|pair| {
            let right = pair.get(1).unwrap_or(&pair[0]);
            hash_pair(&pair[0], right)
        })
        .collect()
}

fn hash_pair(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut joined = [0u8; 64];
    joined[..32].copy_from_slice(left);
    joined[32..].copy_from_slice(right);
    sha256d(&joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_transaction_is_its_own_root() {
        assert_eq!(merkle_root(&[[7u8; 32]]), Some([7u8; 32]));
        assert_eq!(merkle_root(&[]), None);
        assert!(merkle_branch(&[[7u8; 32]]).is_empty());
        assert_eq!(merkle_root_from_branch([7u8; 32], &[]), [7u8; 32]);
    }

    #[test]
    fn the_branch_rebuilds_the_root_for_every_tree_shape() {
        for n in 1..=17u8 {
            let txids: Vec<[u8; 32]> = (0..n).map(|i| [i; 32]).collect();
            let branch = merkle_branch(&txids);
            assert_eq!(
                Some(merkle_root_from_branch(txids[0], &branch)),
                merkle_root(&txids),
                "{n} transactions"
            );
        }
    }
}
