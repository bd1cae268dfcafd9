//! Inode numbers: interned from nodes on first sight and never reused;
//! job inodes computed, not stored (see the module header of `fs`).

use std::collections::HashMap;

use crate::error::{Error, Result};

use super::node::{JOB_FILES, JOB_INO_BASE};
use super::{Fs, Node};
#[derive(Default)]
pub(super) struct Inodes {
    pub(super) next: u64,
    pub(super) by_node: HashMap<Node, u64>,
    pub(super) by_ino: HashMap<u64, Node>,
}

impl Fs {
    // ---- inodes -------------------------------------------------------

    pub(super) fn ino(&self, node: &Node) -> u64 {
        match node {
            Node::Job(id) => return JOB_INO_BASE + id * 16,
            Node::JobFile(id, f) => return JOB_INO_BASE + id * 16 + 1 + f.index(),
            _ => {}
        }
        let mut t = self.inodes.lock().unwrap();
        if let Some(&ino) = t.by_node.get(node) {
            return ino;
        }
        let ino = t.next;
        t.next += 1;
        t.by_node.insert(node.clone(), ino);
        t.by_ino.insert(ino, node.clone());
        ino
    }

    /// After a rename the kernel keeps the inode under its new name, so the
    /// inode must mean the new node from now on.
    pub(super) fn move_ino(&self, from: &Node, to: &Node) {
        let mut t = self.inodes.lock().unwrap();
        if let Some(ino) = t.by_node.remove(from) {
            t.by_ino.insert(ino, to.clone());
            t.by_node.insert(to.clone(), ino);
        }
    }

    pub(super) fn node(&self, ino: u64) -> Result<Node> {
        if ino >= JOB_INO_BASE {
            let (id, k) = ((ino - JOB_INO_BASE) / 16, (ino - JOB_INO_BASE) % 16);
            return match k {
                0 => Ok(Node::Job(id)),
                k => JOB_FILES
                    .get(k as usize - 1)
                    .map(|(_, f)| Node::JobFile(id, *f))
                    .ok_or_else(|| Error::NotFound(format!("inode {ino}"))),
            };
        }
        self.inodes.lock().unwrap().by_ino.get(&ino).cloned().ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }
}
