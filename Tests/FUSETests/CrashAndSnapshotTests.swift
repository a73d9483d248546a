import Foundation
import PersistentData
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// Crash consistency and snapshots through the real `thinfs-mount` daemon.
@Suite("thinfs-mount crashes and snapshots", .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available,
                                                      "needs /dev/fuse, root, e2fsprogs, thin-provisioning-tools and the built binaries"))
struct CrashAndSnapshotTests {
    struct Root {
        let dir = TempDir()
        var path: String { dir.path + "/root" }

        init(size: String = "256M") throws {
            for args in [["pool", "create", "--root", path, "--data-size", "4G", "--metadata-size", "32M"],
                         ["pool", "message", "--root", path, "create_thin", "1"],
                         ["dev", "format", "--root", path, "1", "--size", size]] {
                let r = try Binaries.run("thinfs", args)
                guard r.status == 0 else { throw Oracle.OracleError.failed("thinfs \(args): \(r.stderr)") }
            }
        }

        func mount(_ id: ThinDeviceID, at mountpoint: String, readOnly: Bool = false, environment: [String: String] = [:]) throws {
            try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
            let r = try Binaries.run("thinfs-mount", ["--root", path, "--device", "\(id)", mountpoint] + (readOnly ? ["-o", "ro"] : []),
                                     environment: environment)
            guard r.status == 0 else { throw Oracle.OracleError.failed("thinfs-mount: \(r.stderr)") }
        }

        /// Unmounts and waits for the daemon to exit.
        func unmount(_ mountpoint: String) {
            let pid = Binaries.daemon(serving: mountpoint)
            _ = try? Oracle.run("/bin/umount", [mountpoint])
            if Host.isMounted(mountpoint) { _ = try? Oracle.run("/bin/umount", ["-l", mountpoint]) }
            if let pid { _ = eventually(10) { Binaries.exited(pid) } }
        }

        /// The device's bytes as an image file, checked by `e2fsck -fn`.
        func fsck(_ id: ThinDeviceID, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let pool = try PoolRoot(path: path).open(readOnly: true, logger: quietLogger)
            let size = try PoolRoot(path: path).filesystems()[id]!.size
            let image = dir.path + "/dev\(id)-\(UUID().uuidString).img"
            defer { unlink(image) }
            let out = try FileBlockDevice.create(path: FilePath(image), size: size)
            let dev = try pool.openDevice(id, size: size)
            try dev.copy(to: out, length: size)
            let r = try Oracle.run("/sbin/e2fsck", ["-fn", image])
            #expect(r.status == 0, "e2fsck of device \(id):\n\(r.stdout)", sourceLocation: sourceLocation)
        }
    }

    /// SIGKILL the daemon in the middle of a write-heavy workload with many fsyncs. After that the
    /// device holds exactly its last commit: e2fsck is clean, thin_check is clean, and every
    /// file whose fsync returned is intact.
    @Test func sigkillDuringFsyncHeavyWorkload() throws {
        let root = try Root()
        let mnt = root.dir.path + "/mnt"
        try root.mount(1, at: mnt)
        defer { root.unmount(mnt) }
        guard let pid = Binaries.daemon(serving: mnt) else {
            Issue.record("no daemon found for \(mnt)")
            return
        }

        // A writer in a child process: each file is written, fsynced, and then its name printed.
        // The parent kills the daemon part way; the writer then fails (ENOTCONN) and stops.
        let script = """
            cd '\(mnt)' && mkdir -p work && i=0
            while [ $i -lt 100000 ]; do
              head -c $(( (i % 13) * 1500 + 1 )) /dev/urandom > work/f$i.tmp || exit 0
              dd if=work/f$i.tmp of=work/f$i bs=65536 conv=fsync status=none 2>/dev/null || exit 0
              echo "$i $(sha256sum < work/f$i | cut -c1-64)" || exit 0
              i=$((i+1))
            done
            """
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: "/bin/sh")
        writer.arguments = ["-c", script]
        let out = Pipe()
        writer.standardOutput = out
        writer.standardError = FileHandle.nullDevice
        try writer.run()
        // Also untar something in parallel, without fsyncs, so uncommitted changes are in flight at the kill.
        let untar = Process()
        untar.executableURL = URL(fileURLWithPath: "/bin/sh")
        untar.arguments = ["-c", "mkdir -p '\(mnt)/untar' && tar -C /usr/share -cf - doc 2>/dev/null | tar -C '\(mnt)/untar' -xf - 2>/dev/null; true"]
        try untar.run()

        Thread.sleep(forTimeInterval: 4)
        #expect(kill(pid, SIGKILL) == 0)
        _ = eventually(10) { Binaries.exited(pid) }
        writer.waitUntilExit()
        untar.waitUntilExit()
        let lines = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).split(separator: "\n")
        root.unmount(mnt)
        #expect(!Host.isMounted(mnt))
        #expect(lines.count > 10, "the workload ran before the kill (\(lines.count) fsynced files)")

        try Oracle.check(root.path + "/pool/metadata")
        try root.fsck(1)

        // Every fsynced file is there with its contents.
        try root.mount(1, at: mnt, readOnly: true)
        for line in lines {
            let parts = line.split(separator: " ")
            guard parts.count == 2 else { continue }
            let r = try Oracle.run("/usr/bin/sha256sum", ["\(mnt)/work/f\(parts[0])"])
            #expect(r.stdout.hasPrefix(parts[1]), "f\(parts[0]) was fsynced but is \(r.stdout.isEmpty ? "missing" : "different")")
        }
    }

    /// Write through a mount, unmount, snapshot; then serve the snapshot read-only while the
    /// origin is mounted read-write and changed. The snapshot does not change, and both
    /// filesystems and the pool check clean.
    @Test func snapshotStaysPutWhileTheOriginChanges() throws {
        let root = try Root()
        let origin = root.dir.path + "/origin", snap = root.dir.path + "/snap"
        try root.mount(1, at: origin)
        var b = [UInt8](repeating: 0, count: 100_000)
        for i in 0..<b.count { b[i] = UInt8(truncatingIfNeeded: i * 7) }
        #expect(FileManager.default.createFile(atPath: origin + "/keep", contents: Data(b)))
        #expect(FileManager.default.createFile(atPath: origin + "/change", contents: Data("before".utf8)))
        root.unmount(origin)
        #expect(try Binaries.run("thinfs", ["pool", "message", "--root", root.path, "create_snap", "2", "1"]).status == 0)
        #expect(try PoolRoot(path: root.path).filesystems()[2] == PoolRoot(path: root.path).filesystems()[1], "the snapshot inherits its origin's filesystem record")

        try root.mount(1, at: origin)
        defer { root.unmount(origin) }
        try root.mount(2, at: snap, readOnly: true)
        defer { root.unmount(snap) }
        #expect(FileManager.default.createFile(atPath: origin + "/change", contents: Data("after".utf8)))
        #expect(FileManager.default.createFile(atPath: origin + "/new", contents: Data(repeating: 1, count: 1 << 20)))
        #expect(unlink(origin + "/keep") == 0)
        #expect(FileManager.default.createFile(atPath: snap + "/x", contents: nil) == false, "the snapshot mount is read-only")
        #expect(FileManager.default.contents(atPath: snap + "/change") == Data("before".utf8))
        #expect(FileManager.default.contents(atPath: snap + "/keep") == Data(b))
        #expect(!FileManager.default.fileExists(atPath: snap + "/new"))
        root.unmount(origin)
        root.unmount(snap)
        #expect(FileManager.default.contents(atPath: origin + "/change") == nil, "unmounted")
        try Oracle.check(root.path + "/pool/metadata")
        try root.fsck(1)
        try root.fsck(2)
    }

    /// A device whose bytes are not ext4, or whose ext4 superblock is damaged, is refused with a
    /// clear error, and neither the pool's metadata nor its data change.
    @Test func notExt4AndCorruptSuperblockAreRefusedWithoutWrites() throws {
        let root = try Root(size: "64M")
        let mnt = root.dir.path + "/mnt"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        // Device 2: random bytes, recorded as if formatted.
        #expect(try Binaries.run("thinfs", ["pool", "message", "--root", root.path, "create_thin", "2"]).status == 0)
        let junk = root.dir.path + "/junk"
        #expect(FileManager.default.createFile(atPath: junk, contents: Data((0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 7) })))
        let w = Process()
        w.executableURL = URL(fileURLWithPath: Binaries.path("thinfs"))
        w.arguments = ["dev", "write", "--root", root.path, "2"]
        w.standardInput = FileHandle(forReadingAtPath: junk)
        try w.run()
        w.waitUntilExit()
        #expect(w.terminationStatus == 0)
        try PoolRoot(path: root.path).record(filesystem: .init(type: "ext4", uuid: "none", size: 64 << 20), for: 2)
        // Device 1: a real ext4 whose primary superblock (bytes 1024..<2048) is overwritten.
        let w2 = Process()
        w2.executableURL = URL(fileURLWithPath: Binaries.path("thinfs"))
        w2.arguments = ["dev", "write", "--root", root.path, "1", "--offset", "1024"]
        let pipe = Pipe()
        w2.standardInput = pipe
        try w2.run()
        pipe.fileHandleForWriting.write(Data(repeating: 0x5A, count: 1024))
        try pipe.fileHandleForWriting.close()
        w2.waitUntilExit()
        #expect(w2.terminationStatus == 0)

        // The metadata by content; the 4G sparse data file by its modification time (any write moves it).
        func state() throws -> (Data, Int, Int) {
            var st = Glibc.stat()
            stat(root.path + "/pool/data", &st)
            return (try Data(contentsOf: URL(fileURLWithPath: root.path + "/pool/metadata")), st.st_mtim.tv_sec, st.st_mtim.tv_nsec)
        }
        let before = try state()
        for id in ["1", "2"] {
            for ro in [false, true] {
                let r = try Binaries.run("thinfs-mount", ["--root", root.path, "--device", id, mnt] + (ro ? ["-o", "ro"] : []))
                #expect(r.status != 0, "device \(id) mounted")
                #expect(r.stderr.contains("no ext4 filesystem"), "device \(id): \(r.stderr)")
                #expect(!Host.isMounted(mnt))
            }
        }
        let after = try state()
        #expect(before == after, "a refused mount wrote to the pool")
    }
}
