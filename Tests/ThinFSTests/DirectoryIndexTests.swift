import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSExt4
#if canImport(Glibc)
import Glibc
#endif

/// Htree indexes built for directories the volume grew (Volume+DirectoryIndex.swift), checked by
/// outside oracles: e2fsck's pass 2 (htree structure, hash order, checksums), debugfs's htree_dump,
/// and kernel ext4 reading the image through a loop device.
@Suite("Directory index (htree)", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct DirectoryIndexTests {
    /// An image made by mke2fs with `features` (e.g. "^metadata_csum"), or its defaults.
    static func mkfs(_ path: String, size: UInt64 = 256 << 20, features: String?) throws {
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        let h = FileHandle(forWritingAtPath: path)!
        try h.truncate(atOffset: size)
        try h.close()
        var args = ["-t", "ext4", "-b", "4096", "-F", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
        if let features { args += ["-O", features] }
        let r = try Oracle.run("/sbin/mke2fs", args + [path])
        guard r.status == 0 else { throw Oracle.OracleError.failed("mke2fs: \(r.stderr)") }
    }

    static func open(_ image: String) throws -> Volume {
        try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
    }

    static func create(_ v: Volume, _ dir: UInt64, _ names: some Sequence<String>) throws {
        for n in names { _ = try v.mknod(parent: dir, name: n, mode: 0o100644, rdev: 0, owner: Owner(uid: 0, gid: 0)) }
    }

    @Test(arguments: [nil, "^metadata_csum"])
    func grownDirectoriesAreIndexedAndPassE2fsckAndTheKernel(features: String?) throws {
        let tmp = TempDir()
        let image = tmp.path + "/fs.img"
        try Self.mkfs(image, features: features)
        var big = Set((0..<5_000).map { "file-\($0)-\(String(repeating: "x", count: $0 % 40))" })
        var mid = Set((0..<300).map { "mid-file-\($0)" })
        let small = Set((0..<20).map { "s\($0)" })
        let (a, b, c): (UInt64, UInt64, UInt64)
        do {
            let v = try Self.open(image)
            let owner = Owner(uid: 0, gid: 0)
            a = try v.mkdir(parent: v.rootInode, name: "a", mode: 0o755, owner: owner).ino
            b = try v.mkdir(parent: v.rootInode, name: "b", mode: 0o755, owner: owner).ino
            c = try v.mkdir(parent: v.rootInode, name: "c", mode: 0o755, owner: owner).ino
            try Self.create(v, a, big)
            try Self.create(v, b, mid)
            try Self.create(v, c, small)
            #expect(try v.getattr(a).size > 4096 && v.getattr(b).size > 4096 && v.getattr(c).size == 4096)
            #expect(try v.indexGrownDirectories() == 2)
            #expect(try v.isIndexed(a) && v.isIndexed(b))
            #expect(try !v.isIndexed(c), "a one-block directory is left for the kernel to index")
            // The daemon still finds every name (the cache lost its layout; lookups go to the disk).
            for n in big.prefix(50) { #expect(try v.lookup(parent: a, name: n).mode & 0o170000 == 0o100000) }
            try v.close()
        }
        try E2fsprogs.check(image)
        let dumpA = try KernelExt4.debugfs(image, "htree_dump /a")
        #expect(dumpA.contains("Root node dump") && dumpA.contains("Number of entries"), "\(dumpA.prefix(400))")
        #expect(try KernelExt4.debugfs(image, "htree_dump /c").contains("Not a hash-indexed directory"))
        if KernelExt4.canLoopMount {
            try KernelExt4.withMount(image) { mnt in
                try KernelExt4.sees(mnt + "/a", big)
                try KernelExt4.sees(mnt + "/b", mid)
                try KernelExt4.sees(mnt + "/c", small)
            }
        }

        // Later changes go through libext2fs's dx_link (leaf splits) and ext2fs_unlink.
        do {
            let v = try Self.open(image)
            let more = (0..<3_000).map { "later-\($0)" }
            try Self.create(v, a, more)
            big.formUnion(more)
            for n in big.sorted().enumerated().filter({ $0.offset % 3 == 0 }).map(\.element) {
                try v.unlink(parent: a, name: n)
                big.remove(n)
            }
            for n in mid.sorted().prefix(100) { try v.unlink(parent: b, name: n); mid.remove(n) }
            try Self.create(v, b, (0..<100).map { "n\($0)" })
            mid.formUnion((0..<100).map { "n\($0)" })
            #expect(try v.isIndexed(a) && v.isIndexed(b))
            var listed = Set<String>()
            try v.readdir(a, after: 0) { e in if e.name != "." && e.name != ".." { listed.insert(e.name) }; return true }
            #expect(listed == big, "the daemon lists \(listed.count) names, expected \(big.count)")
            try v.close()
        }
        try E2fsprogs.check(image)
        if KernelExt4.canLoopMount {
            try KernelExt4.withMount(image) { mnt in
                try KernelExt4.sees(mnt + "/a", big)
                try KernelExt4.sees(mnt + "/b", mid)
            }
        }
    }

    @Test func aDirectoryOfOneBlockIsLeftAloneAndOneOfTwoIsIndexed() throws {
        let tmp = TempDir()
        let image = tmp.path + "/fs.img"
        try Self.mkfs(image, size: 64 << 20, features: nil)
        let v = try Self.open(image)
        let owner = Owner(uid: 0, gid: 0)
        let one = try v.mkdir(parent: v.rootInode, name: "one", mode: 0o755, owner: owner).ino
        let two = try v.mkdir(parent: v.rootInode, name: "two", mode: 0o755, owner: owner).ino
        try Self.create(v, one, (0..<100).map { "f\($0)" })
        var n = 0
        while try v.getattr(two).size == 4096 { try Self.create(v, two, ["g\(n)"]); n += 1 }
        #expect(try v.getattr(one).size == 4096)
        #expect(try !v.indexDirectory(one))
        #expect(try !v.isIndexed(one))
        #expect(try v.indexDirectory(two))
        #expect(try !v.indexDirectory(two), "an indexed directory is not indexed again")
        try v.close()
        try E2fsprogs.check(image)
        if KernelExt4.canLoopMount {
            try KernelExt4.withMount(image) { mnt in try KernelExt4.sees(mnt + "/two", Set((0..<n).map { "g\($0)" })) }
        }
    }

    /// Long names fill a leaf with a dozen entries, so 8,000 of them need more leaves than the
    /// root holds: the index gets a level of dx_nodes (indirect_levels 1).
    @Test func aDirectoryOfMoreLeavesThanTheRootHoldsGetsIndexNodes() throws {
        let tmp = TempDir()
        let image = tmp.path + "/fs.img"
        try Self.mkfs(image, features: nil)
        var names = Set((0..<8_000).map { "\($0)-" + String(repeating: "n", count: 240) })
        let v = try Self.open(image)
        let d = try v.mkdir(parent: v.rootInode, name: "d", mode: 0o755, owner: Owner(uid: 0, gid: 0)).ino
        try Self.create(v, d, names)
        #expect(try v.indexDirectory(d))
        let more = (0..<500).map { "more-\($0)-" + String(repeating: "m", count: 200) }
        try Self.create(v, d, more)
        names.formUnion(more)
        try v.close()
        try E2fsprogs.check(image)
        let dump = try KernelExt4.debugfs(image, "htree_dump /d")
        #expect(dump.contains("Indirect levels: 1"), "\(dump.prefix(400))")
        if KernelExt4.canLoopMount { try KernelExt4.withMount(image) { mnt in try KernelExt4.sees(mnt + "/d", names) } }
    }

    /// The hook: a layer's content writers (image import, apply-diff, the containerd and Docker
    /// appliers) index the directories they grew before the layer is flushed and marked complete.
    @Test func layerWritersIndexTheDirectoriesTheyGrew() throws {
        let dir = TempDir()
        let options = try StorageOptions(parsing: ["dm.basesize=64M", "dm.loopdatasize=512M", "dm.loopmetadatasize=16M"])
        let store = try LayerStore.initialize(root: dir.path + "/store", options: options, logger: quietLogger)
        defer { try? store.close() }
        var (big, small, later): (UInt64, UInt64, UInt64) = (0, 0, 0)
        try store.createImageLayer("image", parent: nil, what: "test") { v in
            big = try v.mkdir(parent: v.rootInode, name: "big", mode: 0o755, owner: .root).ino
            small = try v.mkdir(parent: v.rootInode, name: "small", mode: 0o755, owner: .root).ino
            try Self.create(v, big, (0..<1_000).map { "file-\($0)" })
            try Self.create(v, small, (0..<10).map { "file-\($0)" })
            #expect(try !v.isIndexed(big), "indexed only where the writer is done")
        }
        try store.writeContent("image", what: "test") { v in
            later = try v.mkdir(parent: v.rootInode, name: "later", mode: 0o755, owner: .root).ino
            try Self.create(v, later, (0..<1_000).map { "file-\($0)" })
        }
        let open = try store.openLayer("image", readOnly: true, what: "test")
        defer { try? open.close() }
        #expect(try open.volume.isIndexed(big) && open.volume.isIndexed(later))
        #expect(try !open.volume.isIndexed(small))
        #expect(try open.volume.lookup(parent: later, name: "file-999").ino > 0)
    }

    /// Not a check: writes the two images that scripts/compare/htree-bench.sh times with kernel
    /// ext4, one directory /d of 16,000 files left plain as the daemon grew it, and the same
    /// directory indexed.
    @Test(.enabled(if: ProcessInfo.processInfo.environment["THINFS_HTREE_BENCH_DIR"] != nil,
                   "set THINFS_HTREE_BENCH_DIR to write the htree benchmark's images"))
    func benchmarkImages() throws {
        let out = ProcessInfo.processInfo.environment["THINFS_HTREE_BENCH_DIR"]!
        let count = Int(ProcessInfo.processInfo.environment["THINFS_HTREE_BENCH_FILES"] ?? "") ?? 16_000
        let linear = out + "/linear.img", indexed = out + "/indexed.img"
        try? FileManager.default.removeItem(atPath: linear)
        try? FileManager.default.removeItem(atPath: indexed)
        for (image, index) in [(linear, false), (indexed, true)] {
            try Self.mkfs(image, features: nil)
            let v = try Self.open(image)
            let d = try v.mkdir(parent: v.rootInode, name: "d", mode: 0o755, owner: Owner(uid: 0, gid: 0)).ino
            try Self.create(v, d, (0..<count).map { "file-\($0)" })
            if index {
                #expect(try v.indexDirectory(d))
            } else {
                _ = v.takeGrownDirectories()   // left plain by the close too
            }
            try v.close()
            try E2fsprogs.check(image)
        }
    }
}
