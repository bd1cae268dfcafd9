//! The mount helper convention: `mount -t fuse.aifs aifs /mnt/aifs -o
//! data_dir=/var/lib/aifs,allow_other` (or the same line in fstab) makes
//! fuse3's `mount.fuse3` run `aifs aifs /mnt/aifs -o OPTIONS`, and mount(8)
//! may run `mount.fuse.aifs` the same way. Either name (a link to this
//! binary, made by `scripts/install.sh`) turns that into the daemon's own
//! command line: each option `key=value` is `--key value` (`_` becomes
//! `-`), each bare `key` is `--key`, and the generic mount options that
//! are mount(8)'s and the kernel's business are dropped.

use std::ffi::OsString;
use std::path::Path;

/// Names under which the binary is run as a mount helper.
const HELPER_NAMES: [&str; 2] = ["aifs", "mount.fuse.aifs"];

/// Options that mean something to mount(8), fstab or the kernel, not to
/// the daemon (`rw`: it decides per file what may be written).
#[rustfmt::skip]
const GENERIC: [&str; 22] = [
    "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev", "dev", "nodev", "suid",
    "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "async", "sync", "owner",
    // The daemon always mounts with it: the kernel checks each file's mode.
    "default_permissions",
];

/// The daemon's arguments for `args` (argv, program name first): the same
/// when the program is not run by a helper name, else translated.
pub fn daemon_args(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let program = args.first().map(|p| Path::new(p).file_name().unwrap_or_default().to_string_lossy().into_owned());
    // The daemon's own flags (`aifs --help`, `aifs MNT --foreground`): not
    // a mount helper's call.
    let own_flags =
        args.iter().skip(1).any(|a| a.to_str().is_some_and(|a| a.starts_with("--") || a == "-h" || a == "-V"));
    if !program.is_some_and(|p| HELPER_NAMES.contains(&p.as_str())) || own_flags {
        return Ok(args);
    }
    let mut out = vec![args[0].clone()];
    let mut positional = Vec::new();
    let mut rest = args.into_iter().skip(1);
    while let Some(arg) = rest.next() {
        match arg.to_str() {
            Some("-o") => {
                let options = rest.next().ok_or("-o needs a list of options")?;
                let options = options.to_str().ok_or("mount options must be UTF-8")?.to_string();
                for option in options.split(',').filter(|o| !o.is_empty()) {
                    out.extend(translate(option));
                }
            }
            // mount(8)'s own flags to helpers: not the daemon's concern.
            Some("-n" | "-s" | "-f" | "-v") => {}
            Some("-N") => {
                rest.next(); // a mount namespace, by path or pid
            }
            _ => positional.push(arg),
        }
    }
    match positional.as_slice() {
        [_source, mountpoint] => {
            out.insert(1, mountpoint.clone());
            Ok(out)
        }
        _ => Err(format!(
            "as a mount helper: expected SOURCE MOUNTPOINT [-o OPTIONS], got {} arguments \
             (e.g. mount -t fuse.aifs aifs /mnt/aifs -o data_dir=/var/lib/aifs,allow_other)",
            positional.len()
        )),
    }
}

/// One `-o` option as daemon flags.
fn translate(option: &str) -> Vec<OsString> {
    let (key, value) = match option.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (option, None),
    };
    if GENERIC.contains(&key) || key.starts_with("x-") || key == "comment" {
        return vec![];
    }
    let flag = OsString::from(format!("--{}", key.replace('_', "-")));
    match value {
        Some(v) => vec![flag, OsString::from(v)],
        None => vec![flag],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn mount_helper_arguments_become_flags() {
        let got = daemon_args(args(&[
            "/usr/local/bin/aifs",
            "aifs",
            "/mnt/aifs",
            "-o",
            "rw,nofail,x-systemd.automount,data_dir=/var/lib/aifs,allow_other,threads=8,_netdev",
        ]))
        .unwrap();
        assert_eq!(
            got,
            args(&[
                "/usr/local/bin/aifs",
                "/mnt/aifs",
                "--data-dir",
                "/var/lib/aifs",
                "--allow-other",
                "--threads",
                "8"
            ])
        );
    }

    #[test]
    fn the_daemons_own_name_is_left_alone() {
        let plain = args(&["aifs-mountd", "/mnt/aifs", "--foreground"]);
        assert_eq!(daemon_args(plain.clone()).unwrap(), plain);
        let by_hand = args(&["/usr/local/bin/aifs", "/mnt/aifs", "--foreground"]);
        assert_eq!(daemon_args(by_hand.clone()).unwrap(), by_hand);
        let err = daemon_args(args(&["mount.fuse.aifs", "/mnt/aifs"])).unwrap_err();
        assert!(err.contains("expected SOURCE MOUNTPOINT"), "{err}");
    }
}
