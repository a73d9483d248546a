import Foundation
import TestSupport
import Testing
@testable import PersistentData
#if canImport(Glibc)
import Glibc
#endif

/// Issue 14 §1 through real mounts: pool metadata that passes its checksums but contradicts
/// itself, met while containers are mounted. The container reading the damaged range gets EIO;
/// the daemon serving every mount stays up; what is intact still reads, in that container and
/// in another; writes are refused as read-only (EROFS); and `thinfs pool status` and
/// `thinfs info`, asked while the daemon holds the pool, say `ro` and `needs_check` and why,
/// as `dmsetup status` shows the kernel pool's live mode.
@Suite("Damaged pool metadata under mounted containers", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available,
                "needs /dev/fuse, root, the built binaries and thin-provisioning-tools"))
struct DamagedMetadataMountTests {
    /// The keys (virtual blocks) of each leaf of device `id`'s mapping tree, by leaf block.
    static func leafKeys(_ metadata: String, device id: UInt32) throws -> [(block: UInt64, keys: [UInt64])] {
        let md = try ThinMetadata.open(storage: FileMetadataStorage(path: metadata, readOnly: true))
        let root = try #require(md.devices[ThinDeviceID(id)]?.root, "device \(id) is not in \(metadata)")
        var result: [(block: UInt64, keys: [UInt64])] = []
        try md.mappingTree.forEachNode(root) { n, _ in
            guard BTreeNode.isLeaf(n) else { return }
            result.append((n.location, (0..<BTreeNode.count(n)).map { BTreeNode.key(n, $0) }))
        }
        return result
    }

    @Test func aDamagedLeafGivesEIOTheDaemonLivesWritesAreReadOnlyAndStatusSaysWhy() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        try f.ok(["layer", "create", "img"])
        try f.ok(["layer", "create-rw", "c1", "--parent", "img"])
        try f.ok(["layer", "create-rw", "c2", "--parent", "img"])
        let c1 = try f.layerDevice("c1")
        let m1 = f.mountpoint("c1"), m2 = f.mountpoint("c2")
        let small = Array("a small file, mapped before the big one\n".utf8)
        let other = (0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }

        try f.ok(["mount", "c1", m1])
        try f.ok(["mount", "c2", m2])
        #expect(Sys.writeFile(m1 + "/small", small) == 0)
        #expect(Sys.writeFile(m2 + "/other", other) == 0)
        try f.ok(["umount", m1])
        try f.ok(["umount", m2])
        try f.waitForDaemons()
        let before = Set(try Self.leafKeys(f.metadata, device: c1).flatMap(\.keys))

        // 64 MiB: 1,024 pool blocks, several mapping leaves that hold nothing but this file.
        try f.ok(["mount", "c1", m1])
        let pattern = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        var big: [UInt8] = []
        big.reserveCapacity(64 << 20)
        for mib in 0..<64 {
            big.append(UInt8(mib))
            big.append(contentsOf: pattern.dropFirst())
        }
        #expect(Sys.writeFile(m1 + "/big", big) == 0)
        try f.ok(["umount", m1])
        try f.waitForDaemons()
        #expect(try Oracle.check(f.metadata))

        // A leaf of c1 whose every key is a block the big file brought: give it a value size the
        // mapping tree does not use, and reseal it, so only its contents are wrong.
        let fresh = try Self.leafKeys(f.metadata, device: c1).filter { leaf in
            !leaf.keys.isEmpty && leaf.keys.allSatisfy { !before.contains($0) }
        }
        let leaf = try #require(fresh.dropFirst(fresh.count / 2).first, "no mapping leaf of device \(c1) holds only the big file's blocks").block
        do {
            let storage = try FileMetadataStorage(path: f.metadata)
            let b = MetadataBlock(location: leaf)
            try storage.read(block: leaf, into: b.mutableBuffer)
            b.setU32(24, 16)
            b.seal(type: .btreeNode)
            try storage.write(block: leaf, from: b.buffer)
            try storage.sync()
        }

        try f.ok(["mount", "c1", m1])
        try f.ok(["mount", "c2", m2])
        let daemons = f.daemons()
        try #require(daemons.count == 1, "one daemon serves both mounts: \(daemons)")

        // Reading the big file meets the damage: EIO, not a crash and not zeros.
        let fd = open(m1 + "/big", O_RDONLY)
        try #require(fd >= 0, "open big: \(String(cString: strerror(errno)))")
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var readError: Int32 = 0
        var offset = 0
        while offset < big.count {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { readError = errno; break }
            if n == 0 { break }
            let same = chunk.withUnsafeBytes { c in big.withUnsafeBytes { memcmp(c.baseAddress!, $0.baseAddress! + offset, min(n, big.count - offset)) } }
            #expect(same == 0, "bytes at \(offset) read back different")
            offset += n
        }
        close(fd)
        #expect(readError == EIO, "reading past the damaged leaf: \(readError == 0 ? "no error" : String(cString: strerror(readError)))")

        // The daemon lives on and both mounts answer; what is intact still reads.
        #expect(f.daemons() == daemons, "the daemon did not survive: \(f.daemons()) after \(daemons)")
        #expect(Sys.readFile(m1 + "/small") == small)
        #expect(Sys.readFile(m2 + "/other") == other)

        // The pool is read-only now: a new file in the other container is refused with EROFS
        // (at open, write, fsync or close: the writeback cache may take the write first).
        let wfd = open(m2 + "/new", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var failure: (call: String, errno: Int32)? = wfd < 0 ? ("open", errno) : nil
        if wfd >= 0 {
            let n = other.withUnsafeBytes { Glibc.write(wfd, $0.baseAddress, $0.count) }
            if n < 0 { failure = ("write", errno) }
            if fsync(wfd) != 0, failure == nil { failure = ("fsync", errno) }
            if close(wfd) != 0, failure == nil { failure = ("close", errno) }
        }
        let refused = try #require(failure, "a write went through on a pool with damaged metadata")
        #expect(refused.errno == EROFS, "\(refused.call) failed with \(String(cString: strerror(refused.errno)))")

        // Asked while the daemon holds the pool, the status is the daemon's, with the reason.
        let status = try f.run(["pool", "status"])
        #expect(status.status == 0, "\(status.stderr)")
        #expect(status.stdout.contains(" ro ") && status.stdout.contains(" needs_check "), "pool status: \(status.stdout)")
        #expect(status.stderr.contains("block \(leaf)"), "pool status names no damaged block: \(status.stderr)")
        let human = try f.run(["pool", "status", "--human"])
        #expect(human.stdout.contains("Mode: ro (needs_check)") && human.stdout.contains("Read-only Reason: "), "\(human.stdout)")
        let info = try f.run(["info"])
        #expect(info.stdout.contains("Pool Mode: ro, needs_check"), "\(info.stdout)")
        #expect(f.daemons() == daemons)

        try f.ok(["umount", m1])
        try f.ok(["umount", m2])
        try f.waitForDaemons()
        try f.expectNoLeaks()
        // Nothing mended the damage behind the user's back: thin_check still finds it.
        #expect(try Oracle.run("thin_check", [f.metadata]).status != 0)
    }
}
