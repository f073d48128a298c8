//! Debian packages for a guest, fetched with `apt-get download` and unpacked into the cache,
//! never installed. The host's own architecture uses the host's apt lists; another
//! architecture (arm64 on this amd64 machine) uses a private apt state in the cache (its own
//! lists and package cache, an empty dpkg status), so the host's dpkg never learns a foreign
//! architecture and nothing of it can be installed by accident.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{cache_dir, done, step};
use crate::util::output;

/// Where apt looks for one architecture's packages.
pub(super) struct Apt {
    /// The Debian architecture (`amd64`, `arm64`).
    pub(super) arch: &'static str,
    /// The private state directory when `arch` is not the host's.
    private: Option<PathBuf>,
}

impl Apt {
    pub(super) fn for_arch(arch: &'static str) -> Result<Apt> {
        let host = output(Command::new("dpkg").arg("--print-architecture"))?;
        let private = (host.trim() != arch).then(|| cache_dir().join(format!("apt-{arch}")));
        Ok(Apt { arch, private })
    }

    /// `apt-get` or `apt-cache` with the options that select this architecture's state.
    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        if let Some(dir) = &self.private {
            cmd.args(["-o", &format!("APT::Architecture={}", self.arch)])
                .args(["-o", &format!("APT::Architectures::={}", self.arch)])
                .args([
                    "-o",
                    &format!("Dir::State::Lists={}", dir.join("lists").display()),
                ])
                .args(["-o", &format!("Dir::Cache={}", dir.join("cache").display())])
                .args(["-o", "Dir::State::status=/dev/null"]);
        }
        cmd
    }

    fn update(&self) -> Result<()> {
        if let Some(dir) = &self.private {
            fs::create_dir_all(dir.join("lists/partial"))?;
            fs::create_dir_all(dir.join("cache/archives/partial"))?;
        }
        let t = step(&format!(
            "apt-get update for {} (the lists do not know the guest's packages)",
            self.arch
        ));
        output(self.command("apt-get").args(["update", "-qq"]))?;
        done(t, "apt lists updated");
        Ok(())
    }

    /// Candidate versions of `packages`, from one `apt-cache policy` (each call loads the
    /// whole package cache: seconds on a loaded machine).
    fn lookup(&self, packages: &[&str]) -> Result<Vec<Option<String>>> {
        if self
            .private
            .as_ref()
            .is_some_and(|d| !d.join("lists").is_dir())
        {
            return Ok(vec![None; packages.len()]);
        }
        let policy = output(self.command("apt-cache").arg("policy").args(packages))?;
        // Blocks: `name:` (or `name:arch:`) at column 0, then `  Candidate: version`.
        let mut found = std::collections::HashMap::new();
        let mut current = None;
        for line in policy.lines() {
            if !line.starts_with(' ') {
                let name = line.trim_end_matches(':');
                current = Some(name.split(':').next().unwrap_or(name).to_string());
            } else if let (Some(p), Some(v)) = (&current, line.trim().strip_prefix("Candidate:")) {
                let v = v.trim();
                if v != "(none)" {
                    found.insert(p.clone(), v.to_string());
                }
            }
        }
        Ok(packages.iter().map(|p| found.get(*p).cloned()).collect())
    }

    /// The versions apt would download for `packages` (the cache key). Lists that do not know
    /// one of them (a fresh image, or a private state never updated) are updated once.
    pub(super) fn candidates(&self, packages: &[&str]) -> Result<Vec<Option<String>>> {
        let found = self.lookup(packages)?;
        if found.iter().all(Option::is_some) {
            return Ok(found);
        }
        self.update()?;
        self.lookup(packages)
    }

    /// `apt-get download`s each (package, version) into `dir` in one call (each apt call
    /// loads the whole package cache) and returns the .debs' paths.
    fn download(&self, dir: &Path, versions: &[(&str, String)]) -> Result<Vec<PathBuf>> {
        output(
            self.command("apt-get")
                .current_dir(dir)
                .arg("download")
                .args(
                    versions
                        .iter()
                        .map(|(p, v)| format!("{p}:{}={v}", self.arch)),
                ),
        )?;
        let debs = debs(dir)?;
        if debs.len() != versions.len() {
            bail!(
                "apt-get download produced {} .deb(s) for {} package(s)",
                debs.len(),
                versions.len()
            );
        }
        Ok(debs)
    }

    /// Downloads `packages` (at their candidate versions) and unpacks them together into
    /// `<cache>/<name>_<versions>/root`, once per set of versions; returns that root.
    pub(super) fn unpacked(&self, name: &str, packages: &[&str]) -> Result<PathBuf> {
        let mut versions = Vec::new();
        for (p, v) in packages.iter().zip(self.candidates(packages)?) {
            let v = v.with_context(|| {
                format!(
                    "apt knows no {} package {p} (even after apt-get update)",
                    self.arch
                )
            })?;
            versions.push((*p, v));
        }
        let key = if let [(_, v)] = versions.as_slice() {
            v.clone()
        } else {
            // Many packages: one directory per architecture, re-made when a version changes.
            self.arch.to_string()
        };
        // A foreign architecture's trees are named apart (busybox-static has the same version
        // on every architecture).
        let name = match &self.private {
            Some(_) if !name.ends_with(self.arch) => format!("{name}-{}", self.arch),
            _ => name.to_string(),
        };
        let dir = cache_dir().join(format!("{name}_{key}"));
        let manifest: String = versions.iter().map(|(p, v)| format!("{p} {v}\n")).collect();
        let ready = dir.join("ready");
        if fs::read_to_string(&ready).is_ok_and(|r| r == manifest) {
            return Ok(dir.join("root"));
        }
        let t = step(&format!(
            "downloading {name} ({}, {} package(s))",
            self.arch,
            versions.len()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        for deb in self.download(&dir, &versions)? {
            output(
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&deb)
                    .arg(dir.join("root")),
            )?;
            fs::remove_file(&deb)?;
        }
        fs::write(&ready, manifest)?;
        done(t, "unpacked");
        Ok(dir.join("root"))
    }
}

fn debs(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect())
}

/// A path inside an unpacked package tree with its symlinks resolved inside that tree (an
/// absolute link such as `/bin/ip` means `<root>/bin/ip`, never the host's file).
pub(super) fn resolve_in(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut p = root.join(path.strip_prefix("/").unwrap_or(path));
    for _ in 0..16 {
        let Ok(target) = fs::read_link(&p) else {
            return Ok(p);
        };
        p = if target.is_absolute() {
            root.join(target.strip_prefix("/").unwrap_or(&target))
        } else {
            p.parent().unwrap_or(root).join(target)
        };
    }
    bail!("too many symlinks at {}", path.display())
}
