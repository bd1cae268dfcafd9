//! Changing models from the tree: mkdir/rmdir of models, removing
//! versions, aliases as symlinks (create, rename, remove), chmod/chown.

use std::ffi::OsStr;
use std::path::Path;

use crate::error::{Error, Result};
use crate::store::{self, LATEST};

use super::{Attr, Caller, Fs, JobFile, Node};
/// `setattr` changes; `None` leaves a field alone. Time changes are
/// accepted and ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
}

impl Fs {
    /// EBUSY while queued or running jobs use the version.
    pub(super) fn check_no_jobs(&self, model: &str, number: u32) -> Result<()> {
        match self.engine.active_jobs(model, number).as_slice() {
            [] => Ok(()),
            ids => Err(Error::Busy(format!("models/{model}/v{number}: in use by job {ids:?}"))),
        }
    }

    pub fn setattr(&self, ino: u64, change: SetAttr) -> Result<Attr> {
        let node = self.node(ino)?;
        let owner_or_mode = change.mode.is_some() || change.uid.is_some() || change.gid.is_some();
        match &node {
            Node::Model(model) => {
                if change.size.is_some() {
                    return Err(Error::IsDir(format!("models/{model}")));
                }
                if owner_or_mode {
                    self.store.set_owner_mode(model, change.uid, change.gid, change.mode)?;
                }
            }
            Node::Upload(fh) => {
                if let Some(size) = change.size {
                    self.with_pending(*fh, |p| match p.upload.is_some() {
                        true => p
                            .room_for(size, &self.store)
                            .and_then(|()| p.upload.as_mut().expect("checked").set_len(size)),
                        false => Ok(()),
                    })?;
                }
            }
            // What `install` or `shutil.copy` do after copying (mode, times), or
            // the truncation of a second `cp` (which gets a new upload): no change.
            Node::Imported { .. } if change.size.is_none_or(|s| s == 0) => {}
            // `>` truncates before writing a request, command or config: nothing to truncate.
            Node::Infer { .. }
            | Node::Config(_)
            | Node::Trust(_)
            | Node::JobFile(_, JobFile::Input | JobFile::Priority | JobFile::Ctl)
                if !owner_or_mode && change.size.is_none_or(|s| s == 0) => {}
            Node::Version { .. }
            | Node::VersionDir { .. }
            | Node::VersionFile { .. }
            | Node::Blob(_)
            | Node::Link { .. }
            | Node::Infer { .. }
            | Node::Clone { .. }
            | Node::LastError { .. }
            | Node::JobFile(..) => {
                if owner_or_mode || change.size.is_some() {
                    return Err(Error::ReadOnly(self.describe(&node)));
                }
            }
            _ => {
                if owner_or_mode || change.size.is_some() {
                    return Err(Error::NotPermitted(format!("{}: belongs to the daemon", self.describe(&node))));
                }
            }
        }
        self.attr(&node)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        match self.node(parent)? {
            Node::Models => {
                let name = store::validate_name(name.as_encoded_bytes())?;
                let m = self.store.create_model(name, caller.uid, caller.gid, mode)?;
                tracing::info!(model = %m.name, uid = caller.uid, "created model");
                self.attr(&Node::Model(m.name.clone()))
            }
            // So `cp -r DIR models/x/` fails at once: a directory copied file
            // by file has no moment at which it is complete.
            Node::Model(model) => Err(Error::NotPermitted(format!(
                "models/{model}: versions are made by copying a model file in, not by mkdir \
                 (a model of several files: tar -C DIR -cf - . > models/{model}/model.tar)"
            ))),
            node @ (Node::Version { .. } | Node::VersionDir { .. } | Node::Blobs) => {
                Err(Error::ReadOnly(self.describe(&node)))
            }
            node => Err(Error::NotPermitted(format!("{}: cannot make directories here", self.describe(&node)))),
        }
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let parent = self.node(parent)?;
        let name = name.to_str().ok_or_else(|| Error::NotFound(name.to_string_lossy().into_owned()))?;
        match self.child(&parent, name)? {
            Node::Model(model) => {
                self.store.remove_model(&model)?;
                tracing::info!(model = %model, "removed model");
                Ok(())
            }
            Node::Version { model, number } => {
                // The repository is where such a version lives: removed
                // here, it would come back at the next scan of a restart.
                if let Some(origin) = self.version(&model, number)?.1.origin.as_deref() {
                    return Err(Error::NotPermitted(format!(
                        "models/{model}/v{number} comes from the repository directory {origin}: remove it there"
                    )));
                }
                self.check_no_jobs(&model, number)?;
                self.store.delete_version(&model, number)?;
                self.engine.abandon_new_jobs(&model, number);
                tracing::info!(model = %model, version = number, "deleted version");
                Ok(())
            }
            // Removed with its version (so `rm -r` of a version works).
            Node::VersionDir { model, number, .. } => {
                self.store.check_deletable(&*self.store.model(&model)?, number)?;
                self.check_no_jobs(&model, number)
            }
            node @ (Node::Link { .. } | Node::VersionFile { .. } | Node::Blob(_)) => {
                Err(Error::NotDir(self.describe(&node)))
            }
            node => Err(Error::NotPermitted(format!("{}: belongs to the daemon", self.describe(&node)))),
        }
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let parent = self.node(parent)?;
        let name = name.to_str().ok_or_else(|| Error::NotFound(name.to_string_lossy().into_owned()))?;
        match self.child(&parent, name)? {
            // Derived from the model; they go with it (so `rm -r` of a model works).
            Node::Link { alias, .. } if alias == LATEST => Ok(()),
            Node::Config(_) | Node::Trust(_) | Node::ModelStatus(_) => Ok(()),
            Node::Link { model, alias } => {
                self.store.remove_alias(&model, &alias)?;
                tracing::info!(model = %model, alias = %alias, "removed alias");
                Ok(())
            }
            Node::VersionFile { model, number, .. }
            | Node::Infer { model, number }
            | Node::Clone { model, number }
            | Node::LastError { model, number } => {
                self.store.check_deletable(&*self.store.model(&model)?, number)?;
                self.check_no_jobs(&model, number)
            }
            node @ Node::Imported { .. } => Err(Error::NotFound(self.describe(&node))),
            node @ (Node::Model(_) | Node::Version { .. } | Node::VersionDir { .. }) => {
                Err(Error::IsDir(self.describe(&node)))
            }
            node @ Node::Blob(_) => Err(Error::ReadOnly(self.describe(&node))),
            node => Err(Error::NotPermitted(format!("{}: belongs to the daemon", self.describe(&node)))),
        }
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &Path) -> Result<Attr> {
        match self.node(parent)? {
            Node::Model(model) => {
                let alias = store::validate_name(name.as_encoded_bytes())?;
                let target =
                    target.to_str().ok_or_else(|| Error::InvalidArgument("alias target is not UTF-8".into()))?;
                let number = self.store.create_alias(&model, alias, target)?;
                tracing::info!(model = %model, alias = %alias, version = number, "created alias");
                self.attr(&Node::Link { model, alias: alias.to_string() })
            }
            node => Err(Error::NotPermitted(format!(
                "{}: symlinks are aliases and live in a model directory",
                self.describe(&node)
            ))),
        }
    }

    /// Renames an alias within one model (what `ln -sfn` does), replacing
    /// the target alias unless `no_replace`.
    pub fn rename(&self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr, no_replace: bool) -> Result<()> {
        let parent_node = self.node(parent)?;
        let name = name.to_str().ok_or_else(|| Error::NotFound(name.to_string_lossy().into_owned()))?;
        let new_name = store::validate_name(new_name.as_encoded_bytes())?;
        match self.child(&parent_node, name)? {
            Node::Link { model, alias } if alias != LATEST && parent == new_parent => {
                // Only another user alias can be replaced.
                match self.child(&parent_node, new_name) {
                    Ok(Node::Link { alias, .. }) if alias != LATEST => {}
                    Ok(Node::Imported { .. }) | Err(_) => {}
                    Ok(existing) => {
                        return Err(Error::NotPermitted(format!("{}: cannot be replaced", self.describe(&existing))))
                    }
                }
                self.store.rename_alias(&model, &alias, new_name, no_replace)?;
                let renamed = Node::Link { model: model.clone(), alias: new_name.to_string() };
                self.move_ino(&Node::Link { model: model.clone(), alias: alias.clone() }, &renamed);
                tracing::info!(model = %model, from = %alias, to = %new_name, "renamed alias");
                Ok(())
            }
            node => Err(Error::NotPermitted(format!(
                "{}: only aliases can be renamed, within their model",
                self.describe(&node)
            ))),
        }
    }
}
