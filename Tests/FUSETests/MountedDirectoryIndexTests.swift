import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Directories grown through a read-write FUSE mount get an htree index when the mount ends
/// (`Volume.close`, Volume+DirectoryIndex.swift), judged on the device's bytes read out of the
/// pool by debugfs (htree_dump), e2fsck -fn and kernel ext4 through a loop mount.
@Suite("Directories grown through a mount, indexed at unmount", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available
                    && FileManager.default.isExecutableFile(atPath: "/sbin/debugfs"),
                "needs /dev/fuse, root, the built binaries, thin-provisioning-tools and e2fsprogs"))
struct MountedDirectoryIndexTests {
    static let names = Set((0..<2_000).map { "file-\($0)" })
    static let few = Set((0..<20).map { "f\($0)" })

    /// Creates empty files `names` in `dir` through the mount (open and close, as `touch`).
    static func create(_ dir: String, _ names: Set<String>) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        for n in names {
            let fd = open(dir + "/" + n, O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
            try #require(fd >= 0, "creating \(dir)/\(n): errno \(errno)")
            close(fd)
        }
    }

    /// Thin device `device` of the pool at `root` copied out with `thinfs dev read` (no daemon
    /// may hold the pool) to `image`.
    static func export(root: String, device: some BinaryInteger, length: String, to image: String) throws {
        let r = try LayerFixture.shell("\(Binaries.path("thinfs")) dev read --root \(root) \(device) --length \(length) > \(image)")
        try #require(r.status == 0, "dev read \(device): \(r.stderr)")
    }

    /// e2fsck -fn is clean: exit 0, and no question it answered "no".
    static func expectClean(_ image: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image])
        #expect(fsck.status == 0 && !fsck.stdout.contains("Fix? no"), "e2fsck -fn: \(fsck.stdout)\(fsck.stderr)",
                sourceLocation: sourceLocation)
    }

    /// `thinfs mount` of a container layer (the layer daemon, a VolumeGroup member): /d grows
    /// to 2,000 names and is indexed at the unmount; /small stays one block, left to the kernel.
    @Test func aLayerMountIndexesWhatItGrewAtUnmount() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        try f.ok(["layer", "create", "img"])
        try f.ok(["layer", "create-rw", "c1", "--parent", "img"])
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        try Self.create(mnt + "/d", Self.names)
        try Self.create(mnt + "/small", Self.few)
        try f.ok(["umount", mnt])
        try f.waitForDaemons()

        let image = f.dir.path + "/c1.img"
        try Self.export(root: f.root, device: try f.layerDevice("c1"), length: "256M", to: image)
        try Self.expectClean(image)
        let dump = try KernelExt4.debugfs(image, "htree_dump /d")
        #expect(try KernelExt4.isIndexed(image, "/d"), "\(dump.prefix(300))")
        #expect(try !KernelExt4.isIndexed(image, "/small"))
        if KernelExt4.canLoopMount {
            try KernelExt4.withMount(image) { kmnt in
                try KernelExt4.sees(kmnt + "/d", Self.names)
                try KernelExt4.sees(kmnt + "/small", Self.few)
            }
        }
        #expect(try Oracle.check(f.metadata))
        try f.expectNoLeaks()
    }

    /// thinfs-mount of a pool device (a volume that commits its own device): the same at its
    /// unmount; then, mounted again, the directory grows through libext2fs's index and stays
    /// clean.
    @Test func aDeviceMountIndexesWhatItGrewAtUnmount() throws {
        let root = try CrashAndSnapshotTests.Root()
        let mnt = root.dir.path + "/mnt"
        try root.mount(1, at: mnt)
        defer { root.unmount(mnt) }
        try Self.create(mnt + "/d", Self.names)
        root.unmount(mnt)
        let image = root.dir.path + "/dev1.img"
        try Self.export(root: root.path, device: 1, length: "256M", to: image)
        try Self.expectClean(image)
        #expect(try KernelExt4.isIndexed(image, "/d"))

        try root.mount(1, at: mnt)
        let more = Set((0..<1_000).map { "more-\($0)" })
        for n in more {
            let fd = open(mnt + "/d/" + n, O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
            try #require(fd >= 0, "creating d/\(n): errno \(errno)")
            close(fd)
        }
        root.unmount(mnt)
        try Self.export(root: root.path, device: 1, length: "256M", to: image)
        try Self.expectClean(image)
        #expect(try KernelExt4.isIndexed(image, "/d"))
        if KernelExt4.canLoopMount {
            try KernelExt4.withMount(image) { kmnt in try KernelExt4.sees(kmnt + "/d", Self.names.union(more)) }
        }
    }

    /// SIGKILL while the unmount indexes /d (`THINFS_CRASH_AT=index.root`: its leaves are
    /// written out to the device, its root and flag not): the pool is at the commit made before
    /// indexing, so e2fsck is clean, /d is plain, and every name created before the unmount is
    /// there. thinfs-mount runs in the foreground, as this process's child, so that its death by
    /// SIGKILL is seen (a kill that never came would prove nothing).
    @Test func aKillWhileIndexingAtUnmountLeavesTheCommitBeforeIt() throws {
        let root = try CrashAndSnapshotTests.Root()
        let mnt = root.dir.path + "/mnt"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let daemon = Process()
        daemon.executableURL = URL(fileURLWithPath: Binaries.path("thinfs-mount"))
        daemon.arguments = ["--root", root.path, "--device", "1", mnt, "-f"]
        daemon.environment = ProcessInfo.processInfo.environment.merging(["THINFS_CRASH_AT": "index.root"]) { $1 }
        daemon.standardOutput = FileHandle.nullDevice
        daemon.standardError = FileHandle.nullDevice
        try daemon.run()
        defer {
            if Host.isMounted(mnt) { umount2(mnt, Int32(MNT_DETACH)) }
            if daemon.isRunning { kill(daemon.processIdentifier, SIGKILL) }
            daemon.waitUntilExit()
        }
        try #require(eventually(20) { Host.isMounted(mnt) }, "thinfs-mount -f did not mount \(mnt)")
        try Self.create(mnt + "/d", Self.names)
        #expect(try Oracle.run("/bin/umount", [mnt]).status == 0)
        try #require(eventually(30) { !daemon.isRunning }, "the daemon did not end after the unmount")
        #expect(daemon.terminationReason == .uncaughtSignal && daemon.terminationStatus == SIGKILL,
                "the daemon was not killed at the crash point: \(daemon.terminationReason) \(daemon.terminationStatus)")

        let image = root.dir.path + "/dev1.img"
        try Self.export(root: root.path, device: 1, length: "256M", to: image)
        try Self.expectClean(image)
        #expect(try !KernelExt4.isIndexed(image, "/d"), "the kill came before the index was committed")
        if KernelExt4.canLoopMount {
            try KernelExt4.withMount(image) { kmnt in try KernelExt4.sees(kmnt + "/d", Self.names) }
        }
        #expect(try Oracle.check(root.path + "/pool/metadata"))
    }
}
