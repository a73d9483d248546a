import Foundation
import ThinFS

/// One figure of the benchmark, beside its baseline measured in the same run.
struct BenchResult: Codable {
    enum Unit: String, Codable {
        case mibPerSecond = "MiB/s"
        case opsPerSecond = "ops/s"
        case milliseconds = "ms"

        /// Throughputs are better high, latencies low.
        var higherIsBetter: Bool { self != .milliseconds }
    }

    var section: String
    var id: String
    var name: String
    var unit: Unit
    var thinfs: Double
    var baseline: Double?
    /// What the baseline column measured ("raw pread/pwrite", "software crc32c", ...).
    var baselineName: String?
    /// thinfs / baseline of the figures as printed: for a latency, above 1 means slower.
    var ratio: Double?
    var goal: String?
    var pass: Bool?
    var note: String?
}

/// A target printed beside a figure. Missing it never fails the command:
/// benchmarks report, they do not judge.
enum Goal {
    /// thinfs / baseline at least this (throughputs).
    case ratioAtLeast(Double)
    /// thinfs / baseline at most this (size independence of a latency).
    case ratioAtMost(Double)
    /// The thinfs figure below this, in its unit.
    case below(Double)

    func text(_ unit: BenchResult.Unit) -> String {
        switch self {
        case .ratioAtLeast(let x): String(format: ">= %.2fx", x)
        case .ratioAtMost(let x): String(format: "<= %.2fx", x)
        case .below(let x): "< \(Format.number(x)) \(unit.rawValue)"
        }
    }

    func met(value: Double, ratio: Double?) -> Bool {
        switch self {
        case .ratioAtLeast(let x): (ratio ?? 0) >= x
        case .ratioAtMost(let x): (ratio ?? .infinity) <= x
        case .below(let x): value < x
        }
    }
}

/// The sizes and counts a run used, so that a JSON result can be reproduced.
struct BenchConfiguration: Codable {
    var quick: Bool
    var seed: UInt64
    var poolBlockSize: UInt64
    var sequentialBytes: UInt64
    var sequentialRequest: Int
    var randomReadsPerRound: Int
    var randomWritesPerRound: Int
    var rounds: Int
    var snapshotSmallBytes: UInt64
    var snapshotLargeBytes: UInt64
    var deleteBytes: UInt64
    var latencyRuns: Int
    var crcHardwareBytes: Int
    var crcSoftwareBytes: Int
}

struct BenchReport: Codable {
    var machine: MachineInfo
    var configuration: BenchConfiguration
    var results: [BenchResult]
    var notes: [String]
    var totalSeconds: Double

    func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(self), as: UTF8.self)
    }

    func text() -> String {
        let m = machine
        let c = configuration
        var out = """
        thinfs bench \(ThinFSVersion.string) (\(m.build) build)\(m.build == "release" ? "" : "  WARNING: build with -c release for meaningful figures")
        machine   \(m.cpus) CPUs, \(m.cpuModel), \(ByteSize.human(m.memoryBytes)) RAM, Linux \(m.kernel)
        scratch   \(m.scratchDirectory) (\(m.fileSystem)), removed at the end
        pool      \(ByteSize.format(c.poolBlockSize)) blocks; sequential \(ByteSize.format(c.sequentialBytes)) in \(ByteSize.format(UInt64(c.sequentialRequest))) requests; \
        random 4K: \(c.randomReadsPerRound) reads and \(c.randomWritesPerRound) writes per round, \(c.rounds) rounds, seed \(c.seed)

        """
        for n in notes { out += "note      \(n)\n" }
        let nameWidth = max(44, results.map(\.name.count).max() ?? 0)
        let header = pad("workload", nameWidth) + "  " + padLeft("unit", 5) + "  " + padLeft("thinfs", 10) + "  " +
            padLeft("baseline", 10) + "  " + padLeft("ratio", 7) + "  " + pad("goal", 10) + "  result"
        var section = ""
        for r in results {
            if r.section != section {
                section = r.section
                out += "\n\(section)\n" + header + "\n"
            }
            var line = pad(r.name, nameWidth) + "  " + padLeft(r.unit.rawValue, 5) + "  " + padLeft(Format.number(r.thinfs), 10) + "  "
            line += padLeft(r.baseline.map(Format.number) ?? "-", 10) + "  "
            line += padLeft(r.ratio.map { String(format: "%.2fx", $0) } ?? "-", 7) + "  "
            line += pad(r.goal ?? "", 10) + "  " + (r.pass.map { $0 ? "PASS" : "MISS" } ?? "")
            out += line.trimmingTrailingSpaces() + "\n"
            if let b = r.baselineName { out += pad("", 4) + "baseline: \(b)" + (r.note.map { "; \($0)" } ?? "") + "\n" }
            else if let n = r.note { out += pad("", 4) + n + "\n" }
        }
        let passed = results.filter { $0.pass == true }.count
        let goals = results.filter { $0.pass != nil }.count
        out += "\n\(passed) of \(goals) goals met; ratio = thinfs / baseline (for ms rows, above 1 is slower). "
        out += String(format: "Total %.1f s.\n", totalSeconds)
        return out
    }

    private func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
    private func padLeft(_ s: String, _ n: Int) -> String { s.count >= n ? s : String(repeating: " ", count: n - s.count) + s }
}

enum Format {
    /// Three significant figures or more: 0.0123, 0.456, 12.3, 4567.
    static func number(_ v: Double) -> String {
        let a = abs(v)
        if a >= 1000 { return String(format: "%.0f", v) }
        if a >= 100 { return String(format: "%.1f", v) }
        if a >= 10 { return String(format: "%.2f", v) }
        if a >= 0.1 { return String(format: "%.3f", v) }
        return String(format: "%.4f", v)
    }
}

extension String {
    fileprivate func trimmingTrailingSpaces() -> String {
        var s = self
        while s.last == " " { s.removeLast() }
        return s
    }
}
