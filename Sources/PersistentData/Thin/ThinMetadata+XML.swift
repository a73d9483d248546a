#if canImport(FoundationXML)
import FoundationXML
#endif
import Foundation

/// thin_dump's XML format (thin-provisioning-tools `thin/xml_format`), element
/// for element:
///
///     <superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
///       <device dev_id="1" mapped_blocks="3" transaction="0" creation_time="0" snap_time="1">
///         <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
///         <single_mapping origin_block="10" data_block="5" time="1"/>
///       </device>
///     </superblock>
///
/// A run of consecutive virtual blocks mapped to consecutive data blocks with
/// the same time is one range_mapping.
extension ThinMetadata {
    /// Writes the current state as thin_dump would print it once committed (or the held metadata snapshot).
    public func dumpXML(metadataSnapshot: Bool = false, to out: (String) -> Void) throws {
        let sb: Superblock
        if metadataSnapshot {
            guard let snap = try self.metadataSnapshot() else { throw MessageError.noMetadataSnapshot }
            sb = snap
        } else {
            sb = superblock
        }
        // A metadata snapshot's superblock copy has its space-map roots wiped
        // (`__reserve_metadata_snap`), so its data block count is 0; thin_dump -m
        // prints that 0 too ("metadata snap, we really don't know").
        let nrDataBlocks = metadataSnapshot ? sb.dataSpaceMap.nrBlocks : dataSM.nrBlocks
        // thin_dump 0.9.0 always prints uuid="" (metadata_dumper.cc passes ""
        // to begin_superblock), though thin_restore stores the attribute's bytes.
        out("<superblock uuid=\"\" time=\"\(sb.time)\" transaction=\"\(sb.transactionID)\" flags=\"\(sb.flags)\" version=\"\(sb.version)\" data_block_size=\"\(sb.dataBlockSize)\" nr_data_blocks=\"\(nrDataBlocks)\">\n")
        var details: [(UInt64, DeviceDetails)] = []
        let mapRoot = metadataSnapshot ? sb.dataMappingRoot : mappingRoot
        let detRoot = metadataSnapshot ? sb.deviceDetailsRoot : detailsRoot
        if !metadataSnapshot {
            for id in devices.keys.sorted() { details.append((UInt64(id), devices[id]!.details)) }
        } else {
            try detailsTree.forEach(detRoot) { id, d in details.append((id, d)); return true }
        }
        for (id, d) in details {
            out("  <device dev_id=\"\(id)\" mapped_blocks=\"\(d.mappedBlocks)\" transaction=\"\(d.transactionID)\" creation_time=\"\(d.creationTime)\" snap_time=\"\(d.snapshottedTime)\">\n")
            guard let root = try topTree.lookup(mapRoot, id) ?? (metadataSnapshot ? nil : devices[ThinDeviceID(id)]?.root) else {
                throw MetadataError.corrupt(block: mapRoot, reason: "device \(id) has no mapping tree")
            }
            var run: (origin: UInt64, data: UInt64, length: UInt64, time: UInt32)?
            func flush() {
                guard let r = run else { return }
                if r.length == 1 {
                    out("    <single_mapping origin_block=\"\(r.origin)\" data_block=\"\(r.data)\" time=\"\(r.time)\"/>\n")
                } else {
                    out("    <range_mapping origin_begin=\"\(r.origin)\" data_begin=\"\(r.data)\" length=\"\(r.length)\" time=\"\(r.time)\"/>\n")
                }
            }
            try mappingTree.forEach(root) { vblock, v in
                let bt = BlockTime(packed: v)
                // Block numbers come from disk: one near 2^64 must end the run, not overflow it
                // (fuzz-btree found `origin + length` trapping in CI).
                if let r = run, r.origin.addingReportingOverflow(r.length) == (vblock, false),
                   r.data.addingReportingOverflow(r.length) == (bt.block, false), r.time == bt.time {
                    run!.length += 1
                } else {
                    flush()
                    run = (vblock, bt.block, 1, bt.time)
                }
                return true
            }
            flush()
            out("  </device>\n")
        }
        out("</superblock>\n")
    }

    public func dumpXML(metadataSnapshot: Bool = false) throws -> String {
        var s = ""
        try dumpXML(metadataSnapshot: metadataSnapshot) { s += $0 }
        return s
    }

    /// Builds fresh metadata from thin_dump XML, as thin_restore does.
    public static func restore(xml: Data, storage: MetadataStorage) throws -> ThinMetadata {
        let parsed = try ThinXMLParser.parse(xml)
        let md = try format(storage: storage, dataBlockSize: parsed.dataBlockSize, nrDataBlocks: parsed.nrDataBlocks)
        md.restoreHeader(uuid: Array(parsed.uuid.utf8), time: parsed.time, transactionID: parsed.transaction, flags: parsed.flags)
        for dev in parsed.devices {
            try md.restoreDevice(dev.id, details: dev.details, mappings: dev.mappings)
        }
        try md.commit()
        return md
    }
}

/// Reads thin_dump XML with Foundation's XMLParser.
struct ThinXMLParser {
    struct ParsedDevice {
        var id: ThinDeviceID
        var details: DeviceDetails
        var mappings: [(UInt64, BlockTime)] = []
    }
    var uuid = ""
    var time: UInt32 = 0
    var transaction: UInt64 = 0
    var flags: UInt32 = 0
    var dataBlockSize: UInt32 = 0
    var nrDataBlocks: UInt64 = 0
    var devices: [ParsedDevice] = []

    enum ParseError: Error, CustomStringConvertible {
        case malformed(line: Int, String)
        var description: String {
            switch self { case .malformed(let line, let why): "XML line \(line): \(why)" }
        }
    }

    static func parse(_ data: Data) throws -> ThinXMLParser {
        let parser = XMLParser(data: data)
        let delegate = Delegate()
        parser.delegate = delegate
        let ok = parser.parse()
        if let e = delegate.error { throw e }
        guard ok else {
            throw ParseError.malformed(line: parser.lineNumber, parser.parserError.map { "\($0)" } ?? "not well-formed")
        }
        guard delegate.sawSuperblock else { throw ParseError.malformed(line: 1, "no <superblock> element") }
        return delegate.result
    }

    final class Delegate: NSObject, XMLParserDelegate {
        var result = ThinXMLParser()
        var error: Error?
        var sawSuperblock = false

        func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?,
                    qualifiedName: String?, attributes: [String: String] = [:]) {
            guard error == nil else { return }
            do {
                func attr<T: FixedWidthInteger>(_ key: String, _: T.Type = T.self) throws -> T {
                    guard let s = attributes[key], let v = T(s) else {
                        throw ParseError.malformed(line: parser.lineNumber, "<\(name)> needs a numeric \(key)=\"...\"")
                    }
                    return v
                }
                switch name {
                case "superblock":
                    sawSuperblock = true
                    result.uuid = attributes["uuid"] ?? ""
                    result.time = try attr("time")
                    result.transaction = try attr("transaction")
                    result.flags = (try? attr("flags")) ?? 0
                    result.dataBlockSize = try attr("data_block_size")
                    result.nrDataBlocks = try attr("nr_data_blocks")
                case "device":
                    let id: UInt32 = try attr("dev_id")
                    result.devices.append(ParsedDevice(
                        id: id,
                        details: DeviceDetails(mappedBlocks: try attr("mapped_blocks"), transactionID: try attr("transaction"),
                                               creationTime: try attr("creation_time"), snapshottedTime: try attr("snap_time"))))
                case "range_mapping", "single_mapping":
                    guard !result.devices.isEmpty else {
                        throw ParseError.malformed(line: parser.lineNumber, "<\(name)> outside a <device>")
                    }
                    let single = name == "single_mapping"
                    let origin: UInt64 = try attr(single ? "origin_block" : "origin_begin")
                    let data: UInt64 = try attr(single ? "data_block" : "data_begin")
                    let length: UInt64 = single ? 1 : try attr("length")
                    let time: UInt32 = try attr("time")
                    // The last block of the run must exist, or `origin + i` traps.
                    if length > 0, origin.addingReportingOverflow(length - 1).overflow || data.addingReportingOverflow(length - 1).overflow {
                        throw ParseError.malformed(line: parser.lineNumber, "<\(name)> of \(length) blocks runs past the last block number")
                    }
                    for i in 0..<length {
                        result.devices[result.devices.count - 1].mappings.append((origin + i, BlockTime(block: data + i, time: time)))
                    }
                default:
                    throw ParseError.malformed(line: parser.lineNumber, "unexpected element <\(name)>")
                }
            } catch {
                self.error = error
                parser.abortParsing()
            }
        }
    }
}
