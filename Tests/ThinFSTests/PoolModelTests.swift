import Foundation
import PersistentData
import TestSupport
import Testing
@testable import ThinFS

/// What the pool should hold, kept independently of the engine.
///
/// Each mapped block carries a token that stands for one pool data block. A
/// snapshot copies tokens; a write to a block whose token another device also
/// holds (or, under the atomic-commit policy, whose token is committed) gets a
/// fresh token, as the engine must allocate a fresh block. So the number of
/// distinct live tokens must equal the pool's used data blocks.
struct PoolModel {
    struct Block {
        var bytes: [UInt8]
        var token: Int
    }
    var devices: [ThinDeviceID: [UInt64: Block]] = [:]
    var committedTokens: Set<Int> = []
    var nextToken = 0
    let blockSize: Int
    let atomic: Bool

    func holders(of token: Int) -> Int {
        devices.values.reduce(0) { n, d in n + d.values.filter { $0.token == token }.count }
    }

    mutating func write(_ id: ThinDeviceID, offset: Int, bytes: [UInt8]) {
        var pos = 0
        while pos < bytes.count {
            let vb = UInt64((offset + pos) / blockSize)
            let inBlock = (offset + pos) % blockSize
            let n = min(blockSize - inBlock, bytes.count - pos)
            var block = devices[id]![vb] ?? Block(bytes: [UInt8](repeating: 0, count: blockSize), token: -1)
            if block.token < 0 || holders(of: block.token) > 1 || (atomic && committedTokens.contains(block.token)) {
                block.token = nextToken
                nextToken += 1
            }
            block.bytes.replaceSubrange(inBlock..<inBlock + n, with: bytes[pos..<pos + n])
            devices[id]![vb] = block
            pos += n
        }
    }

    /// Whole blocks only, as the engine (and dm-thin) unmap.
    mutating func discard(_ id: ThinDeviceID, offset: Int, length: Int) {
        let first = (offset + blockSize - 1) / blockSize
        let end = (offset + length) / blockSize
        guard first < end else { return }
        for vb in first..<end { devices[id]![UInt64(vb)] = nil }
    }

    mutating func commit() {
        committedTokens = Set(devices.values.flatMap { $0.values.map(\.token) })
    }

    var liveTokens: Int { Set(devices.values.flatMap { $0.values.map(\.token) }).count }
}

@Suite("Pool against an in-memory model")
struct PoolModelTests {
    /// Operation count: THINFS_MODEL_OPS (default 3000, CI's budget); seed: THINFS_SEED or random.
    static var operations: Int { Int(ProcessInfo.processInfo.environment["THINFS_MODEL_OPS"] ?? "") ?? 3000 }

    @Test("random operations match the model; thin_check is clean after every commit",
          .enabled(if: Oracle.available, "needs thin-provisioning-tools"),
          arguments: [
              // The default pool: atomic commit, block zeroing.
              (true, true),
              // The kernel's behaviour: committed exclusive blocks are overwritten in place.
              (false, true),
              // skip_block_zeroing: the untouched part of a new block is undefined, so partial writes to fresh blocks are avoided below.
              (true, false),
          ])
    func randomOperations(atomic: Bool, zeroing: Bool) throws {
        let seed = UInt64(ProcessInfo.processInfo.environment["THINFS_SEED"] ?? "") ?? UInt64.random(in: 0...UInt64.max)
        let context = "seed \(seed) (rerun with THINFS_SEED=\(seed)), atomic \(atomic), zeroing \(zeroing)"
        print("PoolModelTests: \(context)")
        var rng = SeededRandom(seed: seed)
        let dir = TempDir()
        let dataPath = dir.path + "/data", metaPath = dir.path + "/metadata"
        let blockSize = 64 << 10
        let nrBlocks: UInt64 = 512
        let options = UserspaceThinPool.Options(blockZeroing: zeroing, atomicCommit: atomic)
        // Implicitly unwrapped so a reopen can drop the old pool (and its exclusive lock) first.
        var pool: UserspaceThinPool! = try UserspaceThinPool.create(dataPath: dataPath, metadataPath: metaPath, dataSize: nrBlocks * UInt64(blockSize),
                                                metadataSize: 8 << 20, blockSize: UInt64(blockSize), options: options, logger: quietLogger)
        var model = PoolModel(blockSize: blockSize, atomic: atomic)
        var committed = model
        let virtualBlocks = 48
        var nextID: ThinDeviceID = 0
        var commits = 0

        let zeros = [UInt8](repeating: 0, count: blockSize)
        func verify(_ m: PoolModel) throws {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
            defer { buffer.deallocate() }
            for (id, blocks) in m.devices {
                let details = try pool.details(id)
                #expect(details.mappedBlocks == UInt64(blocks.count), "device \(id) mapped_blocks; \(context)")
                for vb in 0..<UInt64(virtualBlocks) {
                    try pool.read(id, into: buffer, at: vb * UInt64(blockSize))
                    let expected = blocks[vb]?.bytes ?? zeros
                    let same = expected.withUnsafeBytes { memcmp($0.baseAddress!, buffer.baseAddress!, blockSize) == 0 }
                    guard same else {
                        Issue.record("device \(id) block \(vb) differs from the model; \(context)")
                        return
                    }
                }
            }
            #expect(Set(try pool.deviceIDs()) == Set(m.devices.keys), "device set; \(context)")
            #expect(try pool.status().usedDataBlocks == UInt64(m.liveTokens), "used data blocks; \(context)")
        }

        for step in 0..<Self.operations {
            let ids = model.devices.keys.sorted()
            let roll = Int.random(in: 0..<100, using: &rng)
            do {
                switch roll {
                case 0..<5 where ids.count < 8:
                    try pool.message(.createThin(nextID))
                    model.devices[nextID] = [:]
                    nextID += 1
                    model.commit()   // messages commit
                    committed = model
                case 5..<10 where !ids.isEmpty && ids.count < 8:
                    let origin = ids.randomElement(using: &rng)!
                    // Mostly with the transaction id in the same commit (a journaled create, one
                    // commit for both messages); now and then with a wrong current id, which fails
                    // after the snapshot: the snapshot is committed as if sent alone.
                    let form = Int.random(in: 0..<4, using: &rng)
                    if form == 0 {
                        try pool.message(.createSnap(nextID, origin: origin))
                    } else {
                        let tx = try pool.status().transactionID
                        let close = PoolMessage.setTransactionID(current: form == 3 ? tx + 7 : tx, new: tx + 1)
                        do {
                            try pool.messages([.createSnap(nextID, origin: origin), close])
                            #expect(form != 3, "a wrong transaction id was taken; \(context)")
                            #expect(try pool.status().transactionID == tx + 1, "\(context)")
                        } catch ThinPoolError.message(.transactionIDMismatch) where form == 3 {
                            #expect(try pool.status().transactionID == tx, "\(context)")
                        }
                    }
                    model.devices[nextID] = model.devices[origin]
                    nextID += 1
                    model.commit()
                    committed = model
                case 10..<13 where ids.count > 1:
                    let id = ids.randomElement(using: &rng)!
                    try pool.message(.delete(id))
                    model.devices[id] = nil
                    model.commit()
                    committed = model
                case 13..<70 where !ids.isEmpty:
                    let id = ids.randomElement(using: &rng)!
                    var offset = Int.random(in: 0..<(virtualBlocks * blockSize - 1), using: &rng)
                    var length = Int.random(in: 1...min(3 * blockSize, virtualBlocks * blockSize - offset), using: &rng)
                    if !zeroing {
                        // Without zeroing, only whole-block writes have a defined result on fresh blocks.
                        offset = offset / blockSize * blockSize
                        length = max(1, length / blockSize) * blockSize
                        length = min(length, virtualBlocks * blockSize - offset)
                    }
                    let bytes = randomBytes(length, using: &rng)
                    try bytes.withUnsafeBytes { try pool.write(id, $0, at: UInt64(offset)) }
                    model.write(id, offset: offset, bytes: bytes)
                case 70..<78 where !ids.isEmpty:
                    let id = ids.randomElement(using: &rng)!
                    let offset = Int.random(in: 0..<(virtualBlocks * blockSize), using: &rng)
                    let length = Int.random(in: 1...(virtualBlocks * blockSize - offset), using: &rng)
                    try pool.discard(id, offset: UInt64(offset), length: UInt64(length))
                    model.discard(id, offset: offset, length: length)
                case 78..<88:
                    try pool.commit()
                    model.commit()
                    committed = model
                    commits += 1
                    try verify(model)
                    try Oracle.check(metaPath)
                case 88..<92:
                    // Reopen after a commit.
                    try pool.commit()
                    model.commit()
                    committed = model
                    pool = nil
                    pool = try UserspaceThinPool.open(dataPath: dataPath, metadataPath: metaPath, options: options, logger: quietLogger)
                    try verify(model)
                case 92..<96:
                    // Crash: abandon the transaction and reopen. Only the last commit survives.
                    pool = nil
                    pool = try UserspaceThinPool.open(dataPath: dataPath, metadataPath: metaPath, options: options, logger: quietLogger)
                    model = committed
                    if atomic {
                        try verify(model)
                    } else {
                        // In place overwrites may have reached committed blocks: only metadata is exact.
                        for (id, blocks) in model.devices {
                            #expect(try pool.details(id).mappedBlocks == UInt64(blocks.count), "\(context)")
                        }
                        // Re-read what the engine holds, as the kernel would after a crash.
                        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
                        defer { buffer.deallocate() }
                        for (id, blocks) in model.devices {
                            for (vb, _) in blocks {
                                try pool.read(id, into: buffer, at: vb * UInt64(blockSize))
                                model.devices[id]![vb]!.bytes = Array(buffer)
                            }
                        }
                        committed = model
                    }
                    try Oracle.check(metaPath)
                default:
                    break
                }
            } catch ThinPoolError.noDataSpace {
                // The pool is small on purpose; a full pool must leave everything consistent.
                try pool.abortTransaction()
                model = committed
                try verify(model)
                // Free space by deleting the largest device, if there is more than one.
                if let victim = model.devices.max(by: { $0.value.count < $1.value.count })?.key, model.devices.count > 1 {
                    try pool.message(.delete(victim))
                    model.devices[victim] = nil
                    model.commit()
                    committed = model
                }
            } catch {
                Issue.record("step \(step): \(error); \(context)")
                throw error
            }
        }
        try pool.commit()
        model.commit()
        try verify(model)
        try Oracle.check(metaPath)
        #expect(commits > 0)
        #expect(try pool.dumpXML() == (try Oracle.dump(metaPath)), "\(context)")
    }
}

/// Random bytes, eight at a time (per-byte generation dominates debug-build run time).
func randomBytes(_ count: Int, using rng: inout SeededRandom) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { p in
        var i = 0
        while i < count {
            var v = rng.next()
            for _ in 0..<min(8, count - i) {
                p[i] = UInt8(truncatingIfNeeded: v)
                v >>= 8
                i += 1
            }
        }
    }
    return bytes
}
