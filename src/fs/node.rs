//! What a path in the tree *is*: [`Node`], and its path for messages.

use crate::store::Digest;

use super::Fs;
pub(super) use crate::store::VERSION_FILES;

/// Job inodes are computed, not interned: `JOB_INO_BASE + id * 16` for the
/// directory, `+ 1 + index in JOB_FILES` for its files. So any number of
/// jobs costs the inode table nothing.
pub(super) const JOB_INO_BASE: u64 = 1 << 48;

/// The files of `jobs/<id>/`, in listing order.
pub(super) const JOB_FILES: [(&str, JobFile); 9] = [
    ("status", JobFile::Status),
    ("model", JobFile::Model),
    ("input", JobFile::Input),
    ("output", JobFile::Output),
    ("error", JobFile::Error),
    ("priority", JobFile::Priority),
    ("device", JobFile::Device),
    ("times", JobFile::Times),
    ("ctl", JobFile::Ctl),
];

/// What a path in the tree is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    Readme,
    Status,
    Metrics,
    Models,
    Devices,
    Jobs,
    Blobs,
    Model(String),
    /// `models/<name>/config.json`.
    Config(String),
    /// `models/<name>/trust`: keys and policy for signed versions.
    Trust(String),
    /// `models/<name>/status`: its versions and its imports in flight.
    ModelStatus(String),
    /// A model file just copied in, under the name it was copied to (see
    /// the module header).
    Imported {
        model: String,
        file: String,
        number: u32,
    },
    /// `latest` or a user alias: a symlink to `v<N>`.
    Link {
        model: String,
        alias: String,
    },
    Version {
        model: String,
        number: u32,
    },
    /// A directory inside a multi-file version, by its path there
    /// (`1_Pooling`).
    VersionDir {
        model: String,
        number: u32,
        dir: String,
    },
    VersionFile {
        model: String,
        number: u32,
        file: VersionFile,
    },
    /// `vN/infer`: write a request, read its response (a stream).
    Infer {
        model: String,
        number: u32,
    },
    /// `vN/clone`: each open allocates a new job.
    Clone {
        model: String,
        number: u32,
    },
    /// `vN/error`: why the reader's session's last request failed.
    LastError {
        model: String,
        number: u32,
    },
    Job(u64),
    JobFile(u64, JobFile),
    Device(String),
    DeviceFile {
        device: String,
        file: &'static str,
    },
    Blob(Digest),
    /// A model file being copied in; the number is its file handle.
    Upload(u64),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum VersionFile {
    /// A model file, by its path in the version (`1_Pooling/config.json`).
    Model(String),
    Digest,
    Meta,
    Stats,
    /// Who signed it, or `unsigned`.
    Signature,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobFile {
    Status,
    Model,
    Input,
    Output,
    Error,
    Priority,
    Device,
    Times,
    Ctl,
}

impl JobFile {
    pub(super) fn index(self) -> u64 {
        JOB_FILES.iter().position(|(_, f)| *f == self).expect("every file is listed") as u64
    }

    pub(super) fn name(self) -> &'static str {
        JOB_FILES[self.index() as usize].0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

impl Fs {
    /// A node's path in the tree, for error messages.
    pub(super) fn describe(&self, node: &Node) -> String {
        match node {
            Node::Root => "/".into(),
            Node::Readme => "README".into(),
            Node::Status => "status".into(),
            Node::Metrics => "metrics".into(),
            Node::Config(m) => format!("models/{m}/config.json"),
            Node::Trust(m) => format!("models/{m}/trust"),
            Node::ModelStatus(m) => format!("models/{m}/status"),
            Node::Imported { model, file, .. } => format!("models/{model}/{file}"),
            Node::Models => "models".into(),
            Node::Devices => "devices".into(),
            Node::Jobs => "jobs".into(),
            Node::Blobs => "blobs".into(),
            Node::Model(m) => format!("models/{m}"),
            Node::Link { model, alias } => format!("models/{model}/{alias}"),
            Node::Version { model, number } => format!("models/{model}/v{number}"),
            Node::VersionDir { model, number, dir } => format!("models/{model}/v{number}/{dir}"),
            Node::VersionFile { model, number, file } => {
                let name = match file {
                    VersionFile::Model(name) => name.as_str(),
                    VersionFile::Digest => "digest",
                    VersionFile::Meta => "meta.json",
                    VersionFile::Stats => "stats",
                    VersionFile::Signature => "signature",
                };
                format!("models/{model}/v{number}/{name}")
            }
            Node::Infer { model, number } => format!("models/{model}/v{number}/infer"),
            Node::Clone { model, number } => format!("models/{model}/v{number}/clone"),
            Node::LastError { model, number } => format!("models/{model}/v{number}/error"),
            Node::Job(id) => format!("jobs/{id}"),
            Node::JobFile(id, f) => format!("jobs/{id}/{}", f.name()),
            Node::Device(id) => format!("devices/{id}"),
            Node::DeviceFile { device, file } => format!("devices/{device}/{file}"),
            Node::Blob(d) => format!("blobs/{}", d.file_name()),
            Node::Upload(fh) => self
                .with_pending(*fh, |p| Ok(format!("models/{}/{}", p.model, p.file_name)))
                .unwrap_or_else(|_| format!("upload {fh}")),
        }
    }
}
