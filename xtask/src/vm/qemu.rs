//! Booting the guest under qemu and collecting its console and its results port.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::guests::GuestArch;
use super::kernel::Kernel;

/// KVM only where the CPU has hardware virtualisation and the module is a real KVM (here it is
/// a paravirtual one that cannot run a stock kernel: qemu aborts on MSR 0x10a).
pub(super) fn kvm_usable() -> bool {
    let cpu = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpu
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists()
}

pub(super) struct Boot {
    pub(super) console: String,
    pub(super) results: String,
    pub(super) elapsed: Duration,
    pub(super) timed_out: bool,
}

pub(super) fn boot(
    arch: &GuestArch,
    k: &Kernel,
    initrd: &Path,
    work: &Path,
    kvm: bool,
    timeout: Duration,
) -> Result<Boot> {
    let console = work.join("console.log");
    let results = work.join("results.txt");
    let _ = fs::remove_file(&console);
    let _ = fs::remove_file(&results);
    let mut cmd = Command::new(arch.qemu);
    cmd.args(arch.machine);
    if kvm {
        cmd.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi"]);
        if arch.machine.is_empty() {
            cmd.args(["-cpu", "max"]);
        }
    }
    cmd.args([
        "-smp",
        "2",
        "-m",
        super::GUEST_MEMORY,
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-chardev")
    .arg(format!("file,id=results,path={}", results.display()))
    .args(arch.results_device)
    .arg("-kernel")
    .arg(&k.vmlinux)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    // softlockup_panic: a guest that wedges ends at once (a panic, no end marker) with the
    // stuck CPU's backtrace on the console, instead of running into the timeout.
    // vmtest.results: where /init sends results (a parameter the kernel ignores).
    .arg(format!(
        "console={} panic=-1 quiet loglevel=3 cryptomgr.notests mitigations=off nokaslr \
         softlockup_panic=1 vmtest.results={}",
        arch.console, arch.results_tty
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", arch.qemu))?;
    let mut timed_out = false;
    let mut last_len = 0;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t0.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        // Progress: echo each new result line as it arrives.
        if let Ok(text) = fs::read_to_string(&results)
            && text.len() > last_len
        {
            for l in text[last_len..].lines() {
                println!("vm-test: [{:>5.1} s] {l}", t0.elapsed().as_secs_f64());
            }
            last_len = text.rfind('\n').map_or(last_len, |i| i + 1);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = t0.elapsed();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let mut console_text = fs::read_to_string(&console).unwrap_or_default();
    if !stderr.trim().is_empty() {
        console_text.push_str(&format!("\n[qemu stderr]\n{stderr}"));
    }
    Ok(Boot {
        console: console_text,
        results: fs::read_to_string(&results).unwrap_or_default(),
        elapsed,
        timed_out,
    })
}
