import Foundation
import TestSupport
import Testing
@testable import PersistentData

/// The XML fixtures (see Fixtures/README.md), each through both restores.
@Suite(.enabled(if: Oracle.available, "needs thin-provisioning-tools"))
struct FixtureTests {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")

    static var names: [String] {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        return files.filter { $0.hasSuffix(".xml") }.sorted()
    }

    /// What a fixture says, read by a parser of its own (not `ThinXMLParser`,
    /// which is under test): attributes of the canonical one-element-a-line form.
    struct Expected {
        struct Device {
            var id: ThinDeviceID
            var details: DeviceDetails
            var mappings: [(UInt64, BlockTime)] = []
        }
        var devices: [Device] = []
        var nrDataBlocks: UInt64 = 0
        var transaction: UInt64 = 0
        var time: UInt32 = 0

        init(_ xml: String) {
            for line in xml.split(separator: "\n") {
                var a: [String: UInt64] = [:]
                for part in line.split(separator: " ") {
                    let kv = part.split(separator: "=", maxSplits: 1)
                    guard kv.count == 2 else { continue }
                    a[String(kv[0])] = UInt64(kv[1].trimmingCharacters(in: CharacterSet(charactersIn: "\"/>")))
                }
                if line.contains("<superblock") {
                    nrDataBlocks = a["nr_data_blocks"]!
                    transaction = a["transaction"]!
                    time = UInt32(a["time"]!)
                } else if line.contains("<device") {
                    devices.append(Device(id: ThinDeviceID(a["dev_id"]!), details: DeviceDetails(
                        mappedBlocks: a["mapped_blocks"]!, transactionID: a["transaction"]!,
                        creationTime: UInt32(a["creation_time"]!), snapshottedTime: UInt32(a["snap_time"]!))))
                } else if line.contains("<single_mapping") {
                    devices[devices.count - 1].mappings.append(
                        (a["origin_block"]!, BlockTime(block: a["data_block"]!, time: UInt32(a["time"]!))))
                } else if line.contains("<range_mapping") {
                    for i in 0..<a["length"]! {
                        devices[devices.count - 1].mappings.append(
                            (a["origin_begin"]! + i, BlockTime(block: a["data_begin"]! + i, time: UInt32(a["time"]!))))
                    }
                }
            }
        }
    }

    static let metadataSize: UInt64 = 32 << 20

    @Test func fixturesArePresent() {
        #expect(Self.names.count >= 5, "fixtures in \(Self.directory.path)")
    }

    /// thin_restore writes the metadata; we must read back every mapping and
    /// dump exactly what thin_dump dumps, and our checker must accept it.
    @Test(arguments: names)
    func thinRestoreThenRead(_ name: String) throws {
        let xml = try String(contentsOf: Self.directory.appendingPathComponent(name), encoding: .utf8)
        let expected = Expected(xml)
        let dir = TempDir()
        let path = dir.file("meta", size: Self.metadataSize)
        try Oracle.restore(xml: xml, to: path)

        let md = try ThinMetadata.open(storage: FileMetadataStorage(path: path, readOnly: true))
        #expect(md.nrDataBlocks == expected.nrDataBlocks)
        #expect(md.transactionID == expected.transaction)
        #expect(md.time == expected.time)
        #expect(md.deviceIDs == expected.devices.map(\.id))
        for device in expected.devices {
            #expect(md.details(device.id) == device.details, "\(name): device \(device.id) details")
            var seen: [(UInt64, BlockTime)] = []
            try md.mappings(device.id) { v, bt in seen.append((v, bt)); return true }
            #expect(seen.count == device.mappings.count, "\(name): device \(device.id) mapping count")
            #expect(zip(seen, device.mappings).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }, "\(name): device \(device.id) mappings")
            for (v, bt) in device.mappings {
                let m = try md.lookup(device.id, v)
                guard m?.dataBlock == bt.block, m?.time == bt.time else {
                    Issue.record("\(name): device \(device.id) block \(v) reads \(String(describing: m)), expected \(bt)")
                    break
                }
            }
            // Unmapped neighbours of the first and last mapping read as holes.
            if let first = device.mappings.first?.0, first > 0 { #expect(try md.lookup(device.id, first - 1) == nil) }
            if let last = device.mappings.last?.0, last < .max { #expect(try md.lookup(device.id, last + 1) == nil) }
        }
        if name == "multilevel.xml" {
            var depth = 0
            try md.mappingTree.forEachNode(md.devices[1]!.root) { _, d in depth = max(depth, d) }
            #expect(depth == 2, "the 50000-mapping device should have a three-level tree")
        }
        let ours = try md.dumpXML()
        let theirs = try Oracle.dump(path)
        #expect(ours == theirs, "\(name): dumpXML differs from thin_dump")
        #expect(theirs == xml, "\(name): the fixture is not in thin_dump's form; rerun make-fixtures.sh")
        let report = try md.check()
        #expect(report.isClean, "\(name): \(report)")
    }

    /// Our restore writes the metadata; thin_check must accept it and thin_dump
    /// must give back the input, byte for byte.
    @Test(arguments: names)
    func ourRestoreThenThinDump(_ name: String) throws {
        let data = try Data(contentsOf: Self.directory.appendingPathComponent(name))
        let dir = TempDir()
        let path = dir.file("meta", size: Self.metadataSize)
        let md = try ThinMetadata.restore(xml: data, storage: FileMetadataStorage(path: path))
        try Oracle.check(path)
        let theirs = try Oracle.dump(path)
        #expect(theirs == String(decoding: data, as: UTF8.self), "\(name): thin_dump of our restore differs from the input")
        #expect(try md.dumpXML() == theirs)
        let report = try md.check()
        #expect(report.isClean, "\(name): \(report)")
        // Our space-map summaries are exact (thin_restore's may be one off).
        #expect(report.warnings.isEmpty, "\(name): \(report)")
    }
}
