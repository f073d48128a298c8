"""The built image under a real container runtime: Debian's runc runs the amd64 image that
`cargo xtask image` builds (DETECTOR_IMAGE_ARCHIVE, an OCI archive from `cargo xtask
deploy-test`, unpacked here as a runtime's image store would) with the DaemonSet's container
as the kubelet would ask for it: its args and settings, its exact capabilities, no_new_privs
(allowPrivilegeEscalation: false), a read-only root filesystem, the Localhost seccomp profile
(deploy/detector/seccomp.json, handed to runc as the OCI spec's seccomp section, which runc
loads with libseccomp), hostPID (no PID namespace), its memory limit, and its hostPath mounts
(/sys/fs/bpf read-only with NPA's pin, BTF, tracefs, the trace directory). Its network
namespace is the node namespace of a `detector lab` run from the host (hostNetwork): the lab
plays the node (the agent's pinned map, its cleanups, the port-reuse races) and the detector
in the container must load its programs and report the lab's races.

Unlike test_daemonset.py (the same checks with the development binary and container.py), this
proves the image itself: a static binary alone on a read-only root, under runc's own
namespaces, mounts, capability sets and seccomp loading."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest

import yaml

import netns
from test_daemonset import DEPLOY, MASKS, manifest

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
# What containerd hides from every container (its default spec), so the container sees /proc
# and /sys as it would on a node.
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
          "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def unpack_image(archive, dest):
    """The image config of this machine's architecture in an OCI archive, with its layers
    extracted into dest/rootfs in order (the archive may hold one image or an index of
    several)."""
    with tarfile.open(archive) as tar:
        def blob(desc):
            algo, digest = desc["digest"].split(":")
            return tar.extractfile(f"blobs/{algo}/{digest}")

        desc = json.load(tar.extractfile("index.json"))["manifests"][0]
        doc = json.load(blob(desc))
        while "manifests" in doc:  # an image index: this architecture's manifest
            desc = next(m for m in doc["manifests"]
                        if m.get("platform", {}).get("architecture") == ARCH)
            doc = json.load(blob(desc))
        config = json.load(blob(doc["config"]))
        rootfs = os.path.join(dest, "rootfs")
        os.makedirs(rootfs)
        for layer in doc["layers"]:
            with tarfile.open(fileobj=blob(layer), mode="r:*") as lt:
                # Our own image, but still: nothing may land outside the root.
                for m in lt.getmembers():
                    target = os.path.realpath(os.path.join(rootfs, m.name))
                    assert target.startswith(os.path.realpath(rootfs) + os.sep), m.name
                lt.extractall(rootfs)
    assert config["architecture"] == ARCH, config["architecture"]
    return config, rootfs


def seccomp_section(profile_path):
    """The Localhost profile as the OCI runtime spec's linux.seccomp (what the kubelet's CRI
    runtime hands runc for a Localhost profile: the same actions, names and errno)."""
    profile = json.load(open(profile_path))
    default_errno = profile.get("defaultErrnoRet", 1)
    section = {"defaultAction": profile["defaultAction"], "defaultErrnoRet": default_errno,
               "architectures": profile["architectures"], "syscalls": []}
    for rule in profile["syscalls"]:
        r = {"names": rule["names"], "action": rule["action"]}
        if rule["action"] == "SCMP_ACT_ERRNO":
            r["errnoRet"] = rule.get("errnoRet", default_errno)
        section["syscalls"].append(r)
    return section


def daemonset_container():
    ds = yaml.safe_load(open(os.path.join(DEPLOY, "detector", "daemonset.yaml")))
    pod = ds["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "detector")


def memory_bytes(q):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", q)
    return int(m.group(1)) * units.get(m.group(2), 1)


def bundle_config(image_config, argv, env, caps, node_ns, staging, traces, memory, seccomp):
    """The OCI runtime config of the DaemonSet's detector container."""
    cap_names = [f"CAP_{c}" for c in caps]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        # The hostPath volumes, as the DaemonSet mounts them.
        {"destination": "/sys/fs/bpf", "type": "bind", "source": staging,
         "options": ["rbind", "ro", "rslave"]},
        {"destination": "/sys/kernel/btf", "type": "bind", "source": "/sys/kernel/btf",
         "options": ["rbind", "ro"]},
        {"destination": "/sys/kernel/tracing", "type": "bind", "source": "/sys/kernel/tracing",
         "options": ["rbind", "ro"]},
        {"destination": "/var/lib/detector/traces", "type": "bind", "source": traces,
         "options": ["rbind", "rw"]},
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": image_config["config"]["Entrypoint"] + argv,
            "env": image_config["config"].get("Env", []) + [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "capabilities": {k: cap_names for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "lab-node",
        "mounts": mounts,
        "linux": {
            # hostNetwork: the node's namespace; hostPID: no PID namespace of its own.
            "namespaces": [{"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "network", "path": node_ns}],
            "resources": {"memory": {"limit": memory}},
            "cgroupsPath": f"/detector-runc-test-{os.getpid()}",
            "seccomp": seccomp,
            "maskedPaths": MASKED,
            "readonlyPaths": READONLY,
        },
    }


@unittest.skipUnless(os.environ.get("DETECTOR_IMAGE_ARCHIVE"),
                     "DETECTOR_IMAGE_ARCHIVE is not set: `cargo xtask deploy-test` builds the "
                     "image when no filter (or a filter naming runc) is given")
class Runc(unittest.TestCase):
    def setUp(self):
        self.bin = os.environ.get("DETECTOR_BIN")
        if not self.bin:
            raise AssertionError("DETECTOR_BIN is not set: run through `cargo xtask deploy-test`")
        self.runc = shutil.which("runc")
        if not self.runc:
            raise AssertionError("runc is not installed: run scripts/setup.sh (Debian's runc)")
        self.tmp = tempfile.mkdtemp(prefix="dpl-runc-")
        self.state = os.path.join(self.tmp, "state")
        self.name = f"detector-runc-{os.getpid()}"
        self.procs = []

    def tearDown(self):
        subprocess.run([self.runc, "--root", self.state, "delete", "--force", self.name],
                       capture_output=True)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run([self.bin, "lab", "--cleanup"], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_image_under_runc_with_the_daemonsets_security_context(self):
        t0 = time.monotonic()
        args, caps, settings = manifest()
        pod, container = daemonset_container()
        sc = container["securityContext"]
        # The security context this test reproduces; a change to it must change the test.
        self.assertEqual(sc["capabilities"], {"drop": ["ALL"], "add": caps})
        self.assertIs(sc["allowPrivilegeEscalation"], False)
        self.assertIs(sc["readOnlyRootFilesystem"], True)
        self.assertEqual(sc["runAsUser"], 0)
        self.assertEqual(sc["seccompProfile"]["type"], "Localhost")
        self.assertIs(pod["hostNetwork"], True)
        self.assertIs(pod["hostPID"], True)
        memory = memory_bytes(container["resources"]["limits"]["memory"])

        bundle = os.path.join(self.tmp, "bundle")
        image_config, rootfs = unpack_image(os.environ["DETECTOR_IMAGE_ARCHIVE"], bundle)
        self.assertEqual(sorted(os.listdir(rootfs)), ["detector"], "a FROM scratch image")
        self.assertEqual(image_config["config"]["Cmd"], ["run"])

        settings["NODE_NAME"] = "lab-node"
        argv = [re.sub(r"\$\((\w+)\)", lambda m: settings[m.group(1)], a) for a in args]
        pin = settings["DETECTOR_MAP_PIN"]
        self.assertTrue(pin.startswith("/sys/fs/bpf/"), pin)

        lab_out = open(os.path.join(self.tmp, "lab.json"), "w+")
        lab = subprocess.Popen([self.bin, "lab", "--cycles", "4", "--json", "--trace-dir",
                                os.path.join(self.tmp, "lab-traces")],
                               stdout=lab_out, stderr=subprocess.DEVNULL)
        self.procs.append(lab)
        node = f"/run/netns/lab-{lab.pid}-node"
        lab_pin = f"/tmp/detector-lab-{lab.pid}/bpffs/aws_conntrack_map"
        netns.wait_for(lambda: os.path.exists(node) and os.path.exists(lab_pin), 30, "the lab")

        # The node's /sys/fs/bpf: the agent's map at NPA's pin path. Staged in runc's own
        # private mount namespace, so nothing is left mounted on this machine.
        staging = os.path.join(self.tmp, "node-bpffs")
        traces = os.path.join(self.tmp, "traces")
        os.makedirs(staging)
        os.makedirs(traces)
        config = bundle_config(image_config, argv, {k: settings[k] for k in settings},
                               caps, node, staging, traces, memory,
                               seccomp_section(os.path.join(DEPLOY, "detector", "seccomp.json")))
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        rel = os.path.relpath(pin, "/sys/fs/bpf")
        script = (f"mount -t tmpfs tmpfs {staging} && mkdir -p {staging}/{os.path.dirname(rel)} "
                  f"&& touch {staging}/{rel} && mount --bind {lab_pin} {staging}/{rel} && "
                  f"exec {self.runc} --root {self.state} run --bundle {bundle} {self.name}")
        out = open(os.path.join(self.tmp, "out"), "w+")
        err = open(os.path.join(self.tmp, "err"), "w+")
        det = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                               stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.procs.append(det)

        def log():
            err.seek(0)
            return err.read()

        netns.wait_for(lambda: "watching map" in log() or det.poll() is not None, 60,
                       "the detector's start under runc")
        self.assertIsNone(det.poll(), log())
        state = json.loads(subprocess.run([self.runc, "--root", self.state, "state", self.name],
                                          capture_output=True, text=True, check=True).stdout)
        self.assertEqual(state["status"], "running")
        status = open(f"/proc/{state['pid']}/status").read()
        cap_eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)
        self.assertEqual(cap_eff, sum(1 << MASKS[c] for c in caps), "exactly the added caps")
        cap_bnd = int(re.search(r"CapBnd:\s*([0-9a-f]+)", status).group(1), 16)
        self.assertEqual(cap_bnd, cap_eff)
        self.assertRegex(status, r"Seccomp:\s*2\n")
        self.assertRegex(status, r"NoNewPrivs:\s*1\n")
        # The root is read-only and the node's network namespace is the container's.
        mounts = open(f"/proc/{state['pid']}/mounts").read().splitlines()
        root_opts = next(m.split()[3] for m in mounts if m.split()[1] == "/")
        self.assertIn("ro", root_opts.split(","))
        self.assertEqual(os.stat(f"/proc/{state['pid']}/ns/net").st_ino, os.stat(node).st_ino)
        # The readiness probe's endpoint, on the node's loopback.
        ready = subprocess.run(
            ["nsenter", f"--net={node}", sys.executable, "-c",
             "import urllib.request,sys,time\n"
             "for _ in range(100):\n"
             "  try:\n"
             f"    r=urllib.request.urlopen('http://{settings['DETECTOR_LISTEN']}/readyz',timeout=2)\n"
             "    sys.exit(0 if r.status==200 else 1)\n"
             "  except Exception: time.sleep(0.1)\n"
             "sys.exit(1)"], capture_output=True)
        self.assertEqual(ready.returncode, 0, "/readyz did not answer 200")

        self.assertEqual(lab.wait(timeout=120), 0)
        # As the kubelet stops a container: SIGTERM through the runtime.
        subprocess.run([self.runc, "--root", self.state, "kill", self.name, "TERM"], check=True)
        self.assertEqual(det.wait(timeout=30), 0, log())
        out.seek(0)
        races = [l for l in out if " RACE " in l]
        text = log()
        self.assertNotIn("error:", text)
        self.assertIn(f"found by pin {pin}", text)
        self.assertTrue(any("RACE port-reuse" in l for l in races), f"no race reported:\n{text}")
        lab_out.seek(0)
        truth = json.loads(lab_out.read())["wrongful_deletes"]
        self.assertLessEqual(len(races), truth)
        written = os.listdir(traces)
        self.assertTrue(any(f.startswith("summary-") for f in written), written)
        print(f"\n  runc {subprocess.run([self.runc, '--version'], capture_output=True, text=True).stdout.split()[2]}"
              f": the image's detector (CapEff {cap_eff:#x}, seccomp filter, no_new_privs, ro root) "
              f"reported {len(races)} races; the lab's agent made {truth} wrongful deletes "
              f"({time.monotonic() - t0:.1f} s)", file=sys.stderr)
        print(f"  {text.strip().splitlines()[-1]}", file=sys.stderr)
        lab_out.close()
        out.close()
        err.close()


if __name__ == "__main__":
    unittest.main()
