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
        let device = try f.layerDevice("big")
        let image = f.dir.path + "/big.img"
        let export = try LayerFixture.shell("\(Binaries.path("thinfs")) dev read --root \(f.root) \(device) --length 768M > \(image)")
        #expect(export.status == 0, "\(export.stderr)")
        let fsck = try LayerFixture.shell("/sbin/e2fsck -fn \(image)")
        #expect(fsck.status == 0, "e2fsck: \(fsck.stdout)\(fsck.stderr)")
        let header = try LayerFixture.shell("/sbin/dumpe2fs -h \(image)").stdout
        func field(_ name: String) -> UInt64? {
            header.split(separator: "\n").first { $0.hasPrefix(name + ":") }
                .flatMap { UInt64($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) }
        }
        #expect(field("Block count").flatMap { c in field("Block size").map { c * $0 } } == 768 << 20, "\(header)")
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

    static var packageRoot: URL { URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent() }
    static var canMakeImage: Bool {
        FileManager.default.isExecutableFile(atPath: "/bin/busybox")
            && FileManager.default.fileExists(atPath: packageRoot.appendingPathComponent("scripts/make-test-image.sh").path)
    }

    init(deferredDeletion: Bool, options: [String] = ["dm.basesize=256M", "dm.loopdatasize=2G", "dm.loopmetadatasize=32M"]) throws {
        try ok(["init"] + (options + ["dm.use_deferred_deletion=\(deferredDeletion)"]).flatMap { ["--storage-opt", $0] })
    }

    func run(_ args: [String]) throws -> Oracle.Result {
        // --root goes after the subcommand path: ArgumentParser takes options anywhere after it.
        // umount takes none: the mount table names the root.
        try Binaries.run("thinfs", args.first == "umount" ? args : args + ["--root", root])
    }

    func ok(_ args: [String]) throws {
        let r = try run(args)
        guard r.status == 0 else { throw Failure("thinfs \(args.joined(separator: " ")) failed (\(r.status)): \(r.stderr)") }
    }

    static func shell(_ command: String) throws -> Oracle.Result { try Oracle.run("/bin/sh", ["-c", command]) }

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

    func mountpoint(_ name: String) -> String {
        let p = dir.path + "/mnt-" + name
        try? FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        mountpoints.withLock { $0.append(p) }
        return p
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
        let mounts = (try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? ""
        #expect(!mounts.contains(dir.path), "a mount under \(dir.path) is left")
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
