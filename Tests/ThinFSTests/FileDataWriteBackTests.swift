import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// A file device that records, for the `Volume.write` under way (`begin`/`end`), the bytes of each
/// 4 KiB block that reached it through `writeFileData`; one outside any write is a stray.
private final class FileDataRecorder: BlockDevice, @unchecked Sendable {
    let base: FileBlockDevice
    private let lock = NSLock()
    private var call: Int?
    private(set) var written: [Int: [UInt64: [UInt8]]] = [:]
    private(set) var strays: [String] = []

    init(_ base: FileBlockDevice) { self.base = base }
    func begin(_ call: Int) { lock.withLock { self.call = call } }
    func end() { lock.withLock { call = nil } }

    var size: UInt64 { base.size }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws { try base.read(into: buffer, at: offset) }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws { try base.write(buffer, at: offset) }
    func writeFileData(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try base.write(buffer, at: offset)
        lock.withLock {
            guard let call, offset % 4096 == 0, buffer.count % 4096 == 0 else {
                strays.append("\(buffer.count) bytes at \(offset)\(call == nil ? ", outside any Volume.write" : ", not whole blocks")")
                return
            }
            for i in 0..<(buffer.count / 4096) {
                written[call, default: [:]][offset / 4096 + UInt64(i)] = Array(buffer[(i * 4096)..<((i + 1) * 4096)])
            }
        }
    }
    func discard(offset: UInt64, length: UInt64) throws { try base.discard(offset: offset, length: length) }
    func flush() throws { try base.flush() }
    func close() { base.close() }
    func freeSpace() throws -> PoolFreeSpace? { try base.freeSpace() }
}

/// The volume's block cache marks the blocks a `Volume.write` changes as file data, which the device
/// takes with `writeFileData` (a thin pool keeps its reserve for metadata), and writes them back before
/// the write returns; the marks go with it, so later write-backs send the rest as metadata.
@Suite("Volume file-data write-back", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct FileDataWriteBackTests {
    /// A seeded mix of small creates and writes (as untar does), rewrites and appends, mkdir, chmod,
    /// rename, truncate, unlink and fsync, past the cache's 1,024 blocks, then one write longer than
    /// the cache. After each write returned, the device had every block it touched, with the bytes
    /// of the model, sent as file data during that write (physical blocks from debugfs `bmap` at the
    /// end); nothing went as file data outside a write; e2fsck passes and a new volume reads the model.
    @Test func everyWriteReachesTheDeviceAsFileDataBeforeItReturns() throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 64 << 20)
        let device = FileDataRecorder(try FileBlockDevice(path: FilePath(image)))
        let v = try Volume(device: device, readOnly: false, logger: quietLogger)
        var rng = SeededRandom(seed: 11)
        struct File { var ino: UInt64; var parent: UInt64; var name: String; var model: [UInt8]; let scratch: Bool; var gone = false }
        struct Expected { let call: Int; let file: Int; let block: Int; let bytes: [UInt8] }
        var files: [File] = [], expected: [Expected] = [], dirs = [v.rootInode], calls = 0, names = 0

        func write(_ i: Int, at offset: Int, count: Int) throws {
            calls += 1
            let bytes = (0..<count).map { UInt8(truncatingIfNeeded: ($0 / 97) &* 13 &+ calls &* 31 &+ $0) | 1 }
            device.begin(calls)
            defer { device.end() }
            let wrote = try bytes.withUnsafeBytes { try v.write(files[i].ino, at: UInt64(offset), from: $0) }
            #expect(wrote == count)
            if files[i].model.count < offset + count { files[i].model += [UInt8](repeating: 0, count: offset + count - files[i].model.count) }
            files[i].model.replaceSubrange(offset..<(offset + count), with: bytes)
            guard !files[i].scratch else { return }
            for b in (offset / 4096)...((offset + count - 1) / 4096) {
                var block = Array(files[i].model[(b * 4096)..<min((b + 1) * 4096, files[i].model.count)])
                block += [UInt8](repeating: 0, count: 4096 - block.count)
                expected.append(Expected(call: calls, file: i, block: b, bytes: block))
            }
        }
        func create(scratch: Bool) throws -> Int {
            names += 1
            let parent = dirs[Int.random(in: 0..<dirs.count, using: &rng)]
            let f = try v.mknod(parent: parent, name: "f\(names)", mode: 0o100644, rdev: 0, owner: .root)
            files.append(File(ino: f.ino, parent: parent, name: "f\(names)", model: [], scratch: scratch))
            return files.count - 1
        }
        func pick(scratch: Bool) -> Int? {
            let live = files.indices.filter { files[$0].scratch == scratch && !files[$0].gone }
            return live.isEmpty ? nil : live[Int.random(in: 0..<live.count, using: &rng)]
        }

        for _ in 0..<2400 {
            switch Int.random(in: 0..<100, using: &rng) {
            case 0..<45:
                // A new file of one block, or of 1-10,000 bytes.
                let count = Bool.random(using: &rng) ? 4096 : Int.random(in: 1...10_000, using: &rng)
                try write(try create(scratch: false), at: 0, count: count)
            case 45..<65:
                // Over or past the data of an existing file, never leaving a hole.
                guard let i = pick(scratch: false) else { continue }
                try write(i, at: Int.random(in: 0...files[i].model.count, using: &rng), count: Int.random(in: 1...9000, using: &rng))
            case 65..<70:
                names += 1
                dirs.append(try v.mkdir(parent: dirs[Int.random(in: 0..<dirs.count, using: &rng)], name: "d\(names)", mode: 0o755, owner: .root).ino)
            case 70..<77:
                guard let i = pick(scratch: false) else { continue }
                _ = try v.setattr(files[i].ino, AttributeChanges(mode: Bool.random(using: &rng) ? 0o100600 : 0o100644))
            case 77..<82:
                guard let i = pick(scratch: false) else { continue }
                names += 1
                try v.rename(parent: files[i].parent, name: files[i].name, newParent: files[i].parent, newName: "r\(names)", flags: [])
                files[i].name = "r\(names)"
            case 82..<90:
                try write(try create(scratch: true), at: 0, count: Int.random(in: 1...20_000, using: &rng))
            case 90..<94:
                guard let i = pick(scratch: true) else { continue }
                _ = try v.setattr(files[i].ino, AttributeChanges(size: UInt64(files[i].model.count / 3)))
                files[i].model.removeSubrange((files[i].model.count / 3)...)
            case 94..<96:
                try v.fsync(nil)
            default:
                guard let i = pick(scratch: true) else { continue }
                try v.unlink(parent: files[i].parent, name: files[i].name)
                files[i].gone = true
            }
        }
        // Longer than the cache: the write-back walks the cache rather than the run.
        try write(try create(scratch: false), at: 0, count: 6 << 20)
        try v.close()
        #expect(device.strays.isEmpty, "written as file data outside a write: \(device.strays.prefix(5))")
        try E2fsprogs.check(image)

        // Physical blocks, one debugfs for all of them.
        let pairs = Array(Set(expected.map { "\(files[$0.file].ino) \($0.block)" }))
        let commands = dir.path + "/bmap"
        try pairs.map { "bmap <\($0.split(separator: " ")[0])> \($0.split(separator: " ")[1])" }.joined(separator: "\n")
            .write(toFile: commands, atomically: true, encoding: .utf8)
        let r = try Oracle.run("/sbin/debugfs", ["-f", commands, image])
        let lines = r.stdout.split(separator: "\n")
        var physical: [String: UInt64] = [:]
        for (i, line) in lines.enumerated() where line.hasPrefix("debugfs: bmap <") && i + 1 < lines.count {
            let words = line.dropFirst("debugfs: bmap <".count).split(separator: " ")
            if let ino = words.first?.dropLast(), let block = words.last, let p = UInt64(lines[i + 1]), p != 0 { physical["\(ino) \(block)"] = p }
        }
        #expect(physical.count == pairs.count, "debugfs mapped \(physical.count) of \(pairs.count) blocks:\n\(r.stderr.prefix(500))")
        var failures = 0
        for e in expected {
            guard let p = physical["\(files[e.file].ino) \(e.block)"] else { continue }
            let sent = device.written[e.call]?[p]
            if sent != e.bytes {
                failures += 1
                if failures <= 5 {
                    let what = sent == nil ? "not sent as file data before the write returned" : "sent with other bytes"
                    Issue.record("write \(e.call) to \(files[e.file].name), block \(e.block) (physical \(p)): \(what)")
                }
            }
        }
        #expect(failures == 0, "\(failures) of \(expected.count) written blocks")
        #expect(expected.count > 2000 && calls > 1000, "the workload covers \(expected.count) blocks in \(calls) writes")

        let again = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: true, logger: quietLogger)
        defer { try? again.close() }
        for f in files where !f.gone {
            var back = [UInt8](repeating: 0, count: f.model.count + 4096)
            let n = try back.withUnsafeMutableBytes { try again.read(f.ino, at: 0, into: $0) }
            #expect(n == f.model.count && Array(back.prefix(n)) == f.model, "\(f.name) read back through a new volume")
        }
    }
}
