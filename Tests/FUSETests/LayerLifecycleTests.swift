import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The layer store end to end through the CLI and real FUSE mounts: import an image, start a
/// container, run a program from the image in it with chroot, write, diff, unmount, remove,
/// clean up; deferred deletion of a busy layer; eight containers at once. thin_check and
/// thin_dump judge the pool; /proc judges leaks (mounts, daemons, busy locks).
@Suite("Layer lifecycle", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available && LayerFixture.canMakeImage,
                "needs /dev/fuse, root, the built binaries, thin-provisioning-tools and busybox-static"))
struct LayerLifecycleTests {
    @Test func importRunWriteDiffRemove() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        let top = try f.importImage()
        try f.ok(["layer", "create-rw", "c1", "--parent", top])
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        #expect(Host.isMounted(mnt))

        // A program from the image, in the container.
        let run = try LayerFixture.shell("chroot \(mnt) /bin/busybox sh -c 'echo hello from the container > /hello; /bin/busybox cat /hello; /bin/busybox rm /etc/hostname'")
        #expect(run.status == 0, "\(run.stderr)")
        #expect(run.stdout == "hello from the container\n")

        // The diff of the running container: the new file and a whiteout for the removed one.
        let tar = f.dir.path + "/c1.tar"
        try f.ok(["layer", "diff", "c1", "--output", tar])
        let listing = try LayerFixture.shell("tar -tf \(tar)")
        let names = Set(listing.stdout.split(separator: "\n").map(String.init))
        #expect(names.contains("hello") || names.contains("./hello"), "\(names)")
        #expect(names.contains("etc/.wh.hostname") || names.contains("./etc/.wh.hostname"), "\(names)")

        // Busy without deferred deletion: refused, naming the holder.
        let busy = try f.run(["layer", "rm", "c1"])
        #expect(busy.status != 0 && busy.stderr.contains("busy") && busy.stderr.contains(mnt), "\(busy.stderr)")

        // The diff applied to a fresh snapshot of the image gives the same files.
        try f.ok(["layer", "create-rw", "c2", "--parent", top])
        try f.ok(["layer", "apply-diff", "c2", tar])
        let mnt2 = f.mountpoint("c2")
        try f.ok(["mount", "c2", mnt2, "--ro"])
        #expect(Sys.readFile(mnt2 + "/hello") == Array("hello from the container\n".utf8))
        #expect(Sys.readFile(mnt2 + "/etc/hostname") == nil)
        #expect(Sys.readFile(mnt + "/etc/passwd") == Sys.readFile(mnt2 + "/etc/passwd"))

        try f.ok(["umount", mnt2])
        try f.ok(["umount", mnt])
        // umount returns once the daemon has let go of the layer: it is no longer busy.
        #expect(try f.layerState("c1") == "active")
        try f.ok(["layer", "rm", "c1"])
        try f.ok(["layer", "rm", "c2"])
        try f.waitForDaemons()
        #expect(try f.devices() == f.baseAndImageDevices)
        #expect(try Oracle.check(f.metadata))
        try f.expectNoLeaks()
    }

    @Test func deferredDeletionOfAMountedContainer() throws {
        let f = try LayerFixture(deferredDeletion: true)
        defer { f.tearDown() }
        let top = try f.importImage()
        try f.ok(["layer", "create-rw", "busy", "--parent", top])
        let device = try f.layerDevice("busy")
        let mnt = f.mountpoint("busy")
        try f.ok(["mount", "busy", mnt])
        #expect(Sys.writeFile(mnt + "/data", Array(repeating: 7, count: 1 << 20)) == 0)

        let rm = try f.run(["layer", "rm", "busy"])
        #expect(rm.status == 0 && rm.stdout.contains("deferred"), "\(rm.stdout)\(rm.stderr)")
        #expect(try f.run(["info"]).stdout.contains("Deferred Deleted Device Count: 1"))
        #expect(try f.run(["layer", "ls"]).stdout.contains("deleted"))
        // Removed means gone for users: no second mount, no snapshot of it.
        let again = try f.run(["mount", "busy", f.mountpoint("again")])
        #expect(again.status != 0 && again.stderr.contains("removed"), "\(again.stderr)")
        // Still served until the unmount.
        #expect(Sys.readFile(mnt + "/data")?.count == 1 << 20)
        #expect(try f.devices().contains(device))

        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        #expect(!(try f.devices()).contains(device), "thin_dump still lists the deferred-deleted device \(device)")
        #expect(try f.run(["info"]).stdout.contains("Deferred Deleted Device Count: 0"))
        #expect(try Oracle.check(f.metadata))
        try f.expectNoLeaks()
    }

    /// `create-rw --size` larger than the image grows the container's ext4 (resize2fs through
    /// the device-file FUSE view); smaller is refused. e2fsck judges the result.
    @Test func containerFilesystemGrows() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        let top = try f.importImage()
        let small = try f.run(["layer", "create-rw", "tiny", "--parent", top, "--size", "64M"])
        #expect(small.status != 0 && small.stderr.contains("smaller than its parent"), "\(small.stderr)")
        try f.ok(["layer", "create-rw", "big", "--parent", top, "--size", "768M"])
        let mnt = f.mountpoint("big")
        try f.ok(["mount", "big", mnt])
        var st = statvfs()
        #expect(statvfs(mnt, &st) == 0)
        let bytes = UInt64(st.f_blocks) * UInt64(st.f_frsize)
        #expect(bytes > 700 << 20 && bytes <= 768 << 20, "the container's filesystem is \(bytes) bytes")
        #expect(Sys.readFile(mnt + "/etc/passwd") != nil)   // the image's files are still there
        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        let (fsck, fsBytes) = try f.checkFilesystem("big", length: "768M")
        #expect(fsck.status == 0, "e2fsck: \(fsck.stdout)\(fsck.stderr)")
        #expect(fsBytes == 768 << 20, "the filesystem has \(String(describing: fsBytes)) bytes")
        try f.expectNoLeaks()
    }

    /// A container's processes that drop root (apt's `_apt`, a daemon's own user) can use its
    /// files: every uid may enter the mount, and the kernel still enforces the mode bits.
    @Test func nonRootUsersInAContainer() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        let top = try f.importImage()
        try f.ok(["layer", "create-rw", "c", "--parent", top])
        let mnt = f.mountpoint("c")
        try f.ok(["mount", "c", mnt])
        // A file only root may read, made through the mount.
        #expect(Sys.writeFile(mnt + "/secret", Array("root only\n".utf8)) == 0)
        #expect(chmod(mnt + "/secret", 0o600) == 0)

        // uid 65534 runs the image's busybox in the container and writes in its /tmp.
        let nobody = "chroot --userspec=65534:65534 --groups=65534 \(mnt) /bin/busybox sh -c"
        let run = try LayerFixture.shell("\(nobody) '/bin/busybox id -u; echo written by nobody > /tmp/nobody; /bin/busybox cat /tmp/nobody'")
        #expect(run.status == 0 && run.stdout == "65534\nwritten by nobody\n", "\(run.stdout)\(run.stderr)")
        let (rc, st) = Sys.attributes(mnt + "/tmp/nobody")
        #expect(rc == 0 && st.st_uid == 65534 && st.st_gid == 65534, "rc \(rc), owner \(st.st_uid):\(st.st_gid)")

        // The mode bits still decide: what others may read is readable, the rest is denied. (Output
        // goes to /tmp, not /dev/null: this mount point may be one that is mounted nodev.)
        let steps = try LayerFixture.shell("""
            \(nobody) 'for step in "/bin/busybox cat /etc/hostname" "/bin/busybox ls /etc" \
                "/bin/busybox touch /etc/new" "/bin/busybox cat /secret" "/bin/busybox ls /root" \
                "/bin/busybox ls /home/user" "echo x >> /etc/passwd" "/bin/busybox rm /etc/hostname"; do
                if (eval "$step") >/tmp/out 2>&1; then echo "$step: allowed"; else echo "$step: denied"; fi
            done'
            """)
        #expect(steps.stdout.split(separator: "\n") == [
            "/bin/busybox cat /etc/hostname: allowed",   // 0644
            "/bin/busybox ls /etc: allowed",             // 0755
            "/bin/busybox touch /etc/new: denied",       // 0755 root dir
            "/bin/busybox cat /secret: denied",          // 0600 root file
            "/bin/busybox ls /root: denied",             // 0700 root dir
            "/bin/busybox ls /home/user: denied",        // 0700 of uid 1000 (layer 2)
            "echo x >> /etc/passwd: denied",             // 0644 root file
            "/bin/busybox rm /etc/hostname: denied",     // entry in a 0755 root dir
        ], "\(steps.stdout)\(steps.stderr)")
        #expect(Sys.readFile(mnt + "/etc/new") == nil && Sys.readFile(mnt + "/etc/hostname") != nil)

        // From the host too: uid 65534 in the mount (its cwd set by root, so no directory above counts).
        let host = try LayerFixture.shell("cd \(mnt) && setpriv --reuid=65534 --regid=65534 --clear-groups ls etc/hostname tmp/nobody")
        #expect(host.status == 0 && host.stdout == "etc/hostname\ntmp/nobody\n", "\(host.stdout)\(host.stderr)")

        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        try f.expectNoLeaks()
    }

    /// Set-user-ID programs and device nodes work in a container mounted under a root-only
    /// directory, as Docker mounts under /var/lib/docker: `suid,dev`, as on overlayfs. Under a
    /// directory every user can reach, the mount is `nosuid,nodev` and `thinfs mount` says why (from
    /// the daemon it starts, and from a daemon already running); `-o suid,dev` asks for them anyway.
    @Test func setuidProgramsAndDeviceNodes() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        let top = try f.importImage()
        for id in ["public", "private", "asked", "public2"] { try f.ok(["layer", "create-rw", id, "--parent", top]) }
        let host = "/usr/bin/id"
        try #require(FileManager.default.isExecutableFile(atPath: host))

        /// Makes a character device with /dev/null's numbers (glibc's makedev: major in bits 8-19)
        /// and a set-user-ID-root copy of id(1) in the container at `mnt`; returns whether the
        /// device opens for writing, and the effective and real uid id(1) reports run by uid 65534.
        func probe(_ mnt: String) throws -> (deviceOpens: Bool, uids: String) {
            #expect(mknod(mnt + "/dev/mynull", S_IFCHR | 0o666, dev_t((1 << 8) | 3)) == 0)
            let fd = Glibc.open(mnt + "/dev/mynull", O_WRONLY)
            var opens = false
            if fd >= 0 {
                opens = write(fd, "x", 1) == 1
                close(fd)
            }
            try FileManager.default.copyItem(atPath: host, toPath: mnt + "/bin/id-suid")
            #expect(chown(mnt + "/bin/id-suid", 0, 0) == 0 && chmod(mnt + "/bin/id-suid", 0o4755) == 0)
            let r = try LayerFixture.shell("cd \(mnt) && setpriv --reuid=65534 --regid=65534 --clear-groups sh -c './bin/id-suid -u; ./bin/id-suid -ru'")
            return (opens, r.stdout + r.stderr)
        }

        // The first mount starts the daemon: its warning comes from the daemon before it detaches.
        let publicMnt = try f.publicMountpoint("public")
        let first = try f.run(["mount", "public", publicMnt])
        #expect(first.status == 0 && first.stderr.contains("warning: \(publicMnt) is mounted nosuid,nodev"), "\(first.stderr)")
        #expect(Host.mountOptions(publicMnt).map { $0.contains("nosuid") && $0.contains("nodev") } == true, "\(Host.mountOptions(publicMnt) ?? [])")
        let exposed = try probe(publicMnt)
        #expect(!exposed.deviceOpens && exposed.uids == "65534\n65534\n", "\(exposed)")

        let privateMnt = f.rootOnlyMountpoint("private")
        let second = try f.run(["mount", "private", privateMnt])
        #expect(second.status == 0 && second.stderr.isEmpty, "\(second.stderr)")
        #expect(Host.mountOptions(privateMnt).map { !$0.contains("nosuid") && !$0.contains("nodev") } == true, "\(Host.mountOptions(privateMnt) ?? [])")
        let shielded = try probe(privateMnt)
        #expect(shielded.deviceOpens && shielded.uids == "0\n65534\n", "\(shielded)")
        // The image's own device node too.
        let null = Glibc.open(privateMnt + "/dev/null", O_WRONLY)
        #expect(null >= 0)
        if null >= 0 { close(null) }

        let askedMnt = try f.publicMountpoint("asked")
        let third = try f.run(["mount", "asked", askedMnt, "-o", "suid,dev"])
        #expect(third.status == 0 && third.stderr.isEmpty, "\(third.stderr)")
        #expect(try probe(askedMnt) == (true, "0\n65534\n"))

        // A later mount through the running daemon's socket warns as the first did.
        let publicMnt2 = try f.publicMountpoint("public2")
        let fourth = try f.run(["mount", "public2", publicMnt2])
        #expect(fourth.status == 0 && fourth.stderr.contains("warning: \(publicMnt2) is mounted nosuid,nodev"), "\(fourth.stderr)")

        for mnt in [publicMnt, privateMnt, askedMnt, publicMnt2] { try f.ok(["umount", mnt]) }
        try f.waitForDaemons()
        try f.expectNoLeaks()
    }

    @Test func eightContainersInParallel() throws {
        let f = try LayerFixture(deferredDeletion: true)
        defer { f.tearDown() }
        let top = try f.importImage()
        let failures = Locked<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            do {
                let id = "ctr\(i)", mnt = f.mountpoint(id)
                try f.ok(["layer", "create-rw", id, "--parent", top])
                try f.ok(["mount", id, mnt])
                let payload = (0..<(512 << 10)).map { UInt8(truncatingIfNeeded: $0 &* (i + 3)) }
                guard Sys.writeFile(mnt + "/payload", payload) == 0, Sys.readFile(mnt + "/payload") == payload else {
                    throw LayerFixture.Failure("\(id): the payload did not read back")
                }
                let r = try LayerFixture.shell("chroot \(mnt) /bin/busybox sh -c 'echo \(id) > /who && /bin/busybox cat /who'")
                guard r.stdout == "\(id)\n" else { throw LayerFixture.Failure("\(id): chroot printed '\(r.stdout)' \(r.stderr)") }
                try f.ok(["umount", mnt])
                try f.ok(["layer", "rm", id])
            } catch {
                failures.withLock { $0.append("\(error)") }
            }
        }
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        try f.waitForDaemons()
        #expect(try f.devices() == f.baseAndImageDevices)
        #expect(try Oracle.check(f.metadata))
        try f.expectNoLeaks()
    }
}

/// A layer store in a temporary root, driven through the `thinfs` binary.
final class LayerFixture: @unchecked Sendable {
    struct Failure: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    let dir = TempDir()
    var root: String { dir.path + "/root" }
    var metadata: String { root + "/pool/metadata" }
    private(set) var baseAndImageDevices: Set<UInt32> = []
    private let mountpoints = Locked<[String]>([])
    /// Directories made outside `dir` (`publicMountpoint`), removed by `tearDown`.
    private let publicDirectories = Locked<[String]>([])

    static var packageRoot: URL { URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent() }
    static var canMakeImage: Bool {
        FileManager.default.isExecutableFile(atPath: "/bin/busybox")
            && FileManager.default.fileExists(atPath: packageRoot.appendingPathComponent("scripts/make-test-image.sh").path)
    }

    /// What every `thinfs` command of this store runs under (an absolute program and its
    /// arguments), such as `nsenter --net=...` for a host in a network namespace; its daemons
    /// inherit it.
    let wrapper: [String]

    init(deferredDeletion: Bool, options: [String] = ["dm.basesize=256M", "dm.loopdatasize=2G", "dm.loopmetadatasize=32M"],
         wrapper: [String] = []) throws {
        self.wrapper = wrapper
        try ok(["init"] + (options + ["dm.use_deferred_deletion=\(deferredDeletion)"]).flatMap { ["--storage-opt", $0] })
    }

    func run(_ args: [String]) throws -> Oracle.Result {
        // --root goes after the subcommand path: ArgumentParser takes options anywhere after it.
        // umount takes none: the mount table names the root.
        let args = args.first == "umount" ? args : args + ["--root", root]
        guard let program = wrapper.first else { return try Binaries.run("thinfs", args) }
        return try Oracle.run(program, Array(wrapper.dropFirst()) + [Binaries.path("thinfs")] + args)
    }

    func ok(_ args: [String]) throws {
        let r = try run(args)
        guard r.status == 0 else { throw Failure("thinfs \(args.joined(separator: " ")) failed (\(r.status)): \(r.stderr)") }
    }

    static func shell(_ command: String) throws -> Oracle.Result { try Oracle.run("/bin/sh", ["-c", command]) }

    /// Thin device `device` of the store at `root` (its first `length`, a size such as "256M")
    /// copied out with `thinfs dev read` (no daemon may hold the pool) to `image`, which is
    /// removed afterwards; then `e2fsck -fn` of the copy, and its filesystem's size in bytes by
    /// dumpe2fs (block count × block size). A failed copy is recorded as an issue.
    static func checkFilesystem(root: String, device: some BinaryInteger, length: String, image: String) throws -> (fsck: Oracle.Result, bytes: UInt64?) {
        defer { unlink(image) }
        let export = try shell("\(Binaries.path("thinfs")) dev read --root \(root) \(device) --length \(length) > \(image)")
        #expect(export.status == 0, "dev read \(device): \(export.stderr)")
        let fsck = try shell("/sbin/e2fsck -fn \(image)")
        let header = try shell("/sbin/dumpe2fs -h \(image)").stdout
        func field(_ name: String) -> UInt64? {
            header.split(separator: "\n").first { $0.hasPrefix(name + ":") }
                .flatMap { UInt64($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) }
        }
        return (fsck, field("Block count").flatMap { c in field("Block size").map { c * $0 } })
    }

    /// `checkFilesystem` of layer `id` of this fixture's store.
    func checkFilesystem(_ id: String, length: String) throws -> (fsck: Oracle.Result, bytes: UInt64?) {
        try Self.checkFilesystem(root: root, device: try layerDevice(id), length: length, image: dir.path + "/\(id).img")
    }

    /// Builds the two-layer test image (scripts/make-test-image.sh) and imports its OCI layout.
    func importImage() throws -> String {
        let script = Self.packageRoot.appendingPathComponent("scripts/make-test-image.sh").path
        let made = try Self.shell("bash \(script) \(dir.path)/image")
        guard made.status == 0 else { throw Failure("make-test-image.sh failed: \(made.stderr)") }
        let r = try run(["image", "import", dir.path + "/image/oci"])
        guard r.status == 0, let top = r.stdout.split(separator: "\n").last.map(String.init), top.hasPrefix("sha256:") else {
            throw Failure("image import failed: \(r.stderr)")
        }
        baseAndImageDevices = try devices()
        #expect(baseAndImageDevices.count == 3)   // the base device and two image layers
        return top
    }

    func mountpoint(_ name: String, in parent: String? = nil) -> String {
        let p = (parent ?? dir.path) + "/mnt-" + name
        try? FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        mountpoints.withLock { $0.append(p) }
        return p
    }

    /// A mount point in a directory only root may enter (0700 root:root), as Docker mounts under
    /// /var/lib/docker.
    func rootOnlyMountpoint(_ name: String) -> String {
        let parent = dir.path + "/root-only"
        mkdir(parent, 0o700)
        chmod(parent, 0o700)
        return mountpoint(name, in: parent)
    }

    /// A mount point every user can reach, whatever TMPDIR is: in a 0755 directory in /tmp.
    func publicMountpoint(_ name: String) throws -> String {
        var st = stat()
        guard stat("/tmp", &st) == 0, st.st_mode & 0o001 != 0, stat("/", &st) == 0, st.st_mode & 0o001 != 0 else {
            throw Failure("/ and /tmp must be searchable by everyone for a public mount point")
        }
        var template = Array("/tmp/thinfs-public-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw Failure("mkdtemp in /tmp: errno \(errno)") }
        let parent = String(cString: made)
        chmod(parent, 0o755)
        publicDirectories.withLock { $0.append(parent) }
        return mountpoint(name, in: parent)
    }

    /// Layer `id`'s row of `thinfs layer ls --json`.
    func listing(_ id: String) throws -> [String: Any] {
        let json = try run(["layer", "ls", "--json"]).stdout
        let rows = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
        guard let row = rows.first(where: { $0["id"] as? String == id }) else { throw Failure("layer \(id) is not listed: \(json)") }
        return row
    }

    func layerDevice(_ id: String) throws -> UInt32 {
        guard let dev = try listing(id)["deviceID"] as? Int else { throw Failure("layer \(id) has no device id in layer ls") }
        return UInt32(dev)
    }

    func layerState(_ id: String) throws -> String? { try listing(id)["state"] as? String }

    /// The thin devices thin_dump lists (the pool must be committed: no daemon running).
    func devices() throws -> Set<UInt32> {
        let xml = try Oracle.dump(metadata)
        return Set(xml.split(separator: "\n").compactMap { line -> UInt32? in
            guard line.contains("<device dev_id=\"") else { return nil }
            return UInt32(line.split(separator: "\"")[1])
        })
    }

    /// The pids of thinfs-mount daemons serving this root.
    func daemons() -> [pid_t] {
        let procs = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return procs.compactMap { entry -> pid_t? in
            guard let pid = pid_t(entry), !Binaries.exited(pid),
                  let raw = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline") else { return nil }
            let args = raw.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            return args.first?.hasSuffix("thinfs-mount") == true && args.contains(root) ? pid : nil
        }
    }

    /// The daemon exits after its last unmount, committing the pool; wait for that.
    func waitForDaemons() throws {
        guard eventually(20, { daemons().isEmpty }) else { throw Failure("the daemon for \(root) did not exit: \(daemons())") }
    }

    func expectNoLeaks() throws {
        let mounts = Host.procFile("/proc/mounts") ?? ""
        for d in [dir.path] + publicDirectories.withLock({ $0 }) { #expect(!mounts.contains(d), "a mount under \(d) is left") }
        #expect(daemons().isEmpty)
        let locks = (try? FileManager.default.contentsOfDirectory(atPath: root + "/locks")) ?? []
        #expect(locks.filter { $0.contains(".holder.") }.isEmpty, "busy-lock holder files left: \(locks)")
        #expect(!FileManager.default.fileExists(atPath: root + "/control.sock"))
    }

    /// Unmounts whatever a failed test left, and stops its daemons by pid.
    func tearDown() {
        for mp in mountpoints.withLock({ $0 }) where Host.isMounted(mp) { umount2(mp, Int32(MNT_DETACH)) }
        for pid in daemons() { kill(pid, SIGTERM) }
        _ = eventually(10) { daemons().isEmpty }
        for pid in daemons() { kill(pid, SIGKILL) }
        // Only once nothing is mounted there: removing a live mount's directory would remove its files.
        let mounts = Host.procFile("/proc/mounts") ?? ""
        for d in publicDirectories.withLock({ $0 }) where !mounts.contains(d) { try? FileManager.default.removeItem(atPath: d) }
    }
}

/// A value behind a lock, for the parallel test's threads.
final class Locked<T>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ value: T) { self.value = value }
    func withLock<R>(_ body: (inout T) -> R) -> R {
        lock.lock()
        defer { lock.unlock() }
        return body(&value)
    }
}
