import Foundation
import SystemPackage
import ThinFS

/// Monotonic timing for the benchmarks. `ContinuousClock` reads CLOCK_BOOTTIME
/// on Linux: monotonic, and unaffected by changes to the wall clock.
enum Stopwatch {
    static let clock = ContinuousClock()

    /// Runs `body` once and returns how long it took, in seconds.
    @inline(__always)
    static func seconds(_ body: () throws -> Void) rethrows -> Double {
        let start = clock.now
        try body()
        return (clock.now - start).seconds
    }
}

extension Duration {
    var seconds: Double {
        let c = components
        return Double(c.seconds) + Double(c.attoseconds) * 1e-18
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): a small seeded generator, so that
/// two runs, and the pool and the raw file within a run, see the same offsets.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A page-aligned I/O buffer filled with pseudo-random bytes, so that no layer
/// can take a shortcut for zeros. Freed when the owner lets go of it.
final class IOBuffer {
    let bytes: UnsafeMutableRawBufferPointer

    init(count: Int, rng: inout SplitMix64) {
        bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        let words = bytes.bindMemory(to: UInt64.self)
        for i in words.indices { words[i] = rng.next() }
    }

    deinit { bytes.deallocate() }

    var readOnly: UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes) }
    func prefix(_ n: Int) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: bytes[0..<n]) }
    func mutablePrefix(_ n: Int) -> UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(rebasing: bytes[0..<n]) }
}

/// The statistics the report uses.
enum Stats {
    static func median(_ values: [Double]) -> Double {
        precondition(!values.isEmpty, "median of no samples")
        let s = values.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }
}

/// A directory the benchmark owns: made with mkdtemp inside a parent, removed
/// with everything in it by `remove()`. Removal is idempotent, so the normal
/// path, the error path and a signal handler may all call it.
final class ScratchDirectory: @unchecked Sendable {
    let path: String
    /// Guards `isRemoved`: a signal handler may race the normal exit path.
    private let removed = Lock()
    private var isRemoved = false

    /// Makes `PARENT/thinfs-bench.XXXXXX`. The parent is never removed, so an
    /// existing directory given with --dir keeps whatever else it holds.
    init(parent: String) throws {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: parent, isDirectory: &isDir), isDir.boolValue else {
            throw BenchError.scratch("\(parent) is not a directory; pass an existing directory with --dir")
        }
        var template = Array((parent.hasSuffix("/") ? parent : parent + "/").utf8CString.dropLast()) + Array("thinfs-bench.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else {
            throw BenchError.scratch("cannot create a scratch directory in \(parent): \(String(cString: strerror(errno))); pass a writable directory with --dir")
        }
        path = String(cString: made)
    }

    func file(_ name: String) -> String { path + "/" + name }

    /// Deletes one file now, to give its space back before the next phase.
    func removeFile(_ name: String) { try? FileManager.default.removeItem(atPath: file(name)) }

    func remove() {
        let first = removed.withLock { () -> Bool in
            defer { isRemoved = true }
            return !isRemoved
        }
        if first { try? FileManager.default.removeItem(atPath: path) }
    }
}

enum BenchError: Error, CustomStringConvertible {
    case scratch(String)
    case noSpace(dir: String, needed: UInt64, available: UInt64)

    var description: String {
        switch self {
        case .scratch(let why): why
        case .noSpace(let dir, let needed, let available):
            "the benchmark needs about \(ByteSize.human(needed)) free in \(dir), which has \(ByteSize.human(available)); " +
                "pass --dir on a larger file system, a smaller --size, or --quick"
        }
    }
}

/// The baseline every pool figure is compared with: a sparse file on the same
/// file system, read and written with pread/pwrite through `FileBlockDevice`.
enum RawFile {
    /// Creates the file (it must not exist) with `size` bytes, all a hole.
    static func create(_ path: String, size: UInt64) throws -> FileBlockDevice {
        try FileBlockDevice.create(path: FilePath(path), size: size)
    }
}

/// What the report says about the machine and the scratch file system.
struct MachineInfo: Codable {
    var cpus: Int
    var cpuModel: String
    var memoryBytes: UInt64
    var kernel: String
    var fileSystem: String
    var scratchDirectory: String
    var crc32cHardware: Bool
    var build: String

    static func probe(scratch: String, crc32cHardware: Bool) -> MachineInfo {
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let model = cpuinfo.split(separator: "\n").first { $0.hasPrefix("model name") }
            .flatMap { $0.split(separator: ":", maxSplits: 1).last }
            .map { $0.trimmingCharacters(in: .whitespaces) } ?? "unknown"
        let kernel = ((try? String(contentsOfFile: "/proc/sys/kernel/osrelease", encoding: .utf8)) ?? "unknown")
            .trimmingCharacters(in: .whitespacesAndNewlines)
        #if DEBUG
        let build = "debug"
        #else
        let build = "release"
        #endif
        return MachineInfo(cpus: ProcessInfo.processInfo.activeProcessorCount, cpuModel: model,
                           memoryBytes: ProcessInfo.processInfo.physicalMemory, kernel: kernel,
                           fileSystem: fileSystemType(of: scratch), scratchDirectory: scratch,
                           crc32cHardware: crc32cHardware, build: build)
    }

    /// The type of the file system holding `path`: the longest mount point in
    /// /proc/self/mounts that contains it (proc(5)).
    static func fileSystemType(of path: String) -> String {
        let real = (path as NSString).resolvingSymlinksInPath
        guard let mounts = ProcFile.read("/proc/self/mounts") else { return "unknown" }
        var best: (mountPoint: String, type: String)?
        for line in mounts.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count >= 3 else { continue }
            // Spaces in mount points are escaped as \040 (getmntent(3)).
            let mountPoint = fields[1].replacingOccurrences(of: "\\040", with: " ")
            let contains = mountPoint == "/" || real == mountPoint || real.hasPrefix(mountPoint + "/")
            if contains, mountPoint.count >= (best?.mountPoint.count ?? 0) { best = (mountPoint, String(fields[2])) }
        }
        return best?.type ?? "unknown"
    }

    /// Free bytes for an unprivileged user in the file system holding `path`.
    static func availableBytes(at path: String) -> UInt64? {
        var st = statvfs()
        guard statvfs(path, &st) == 0 else { return nil }
        return UInt64(st.f_bavail) * UInt64(st.f_frsize)
    }
}
