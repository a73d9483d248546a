import Foundation
import TestSupport
import Testing
@testable import PersistentData

/// Corners of the XML round trip that the fixtures (all in thin_dump's own form) do not reach.
@Suite(.enabled(if: Oracle.available, "needs thin-provisioning-tools"))
struct XMLTests {
    /// thin_dump 0.9.0 prints uuid="" whatever the superblock holds, and
    /// thin_restore ignores the attribute; dumpXML must print what thin_dump prints.
    @Test func uuidAttribute() throws {
        let xml = """
        <superblock uuid="abc" time="0" transaction="0" flags="0" version="2" data_block_size="128" nr_data_blocks="100">
        </superblock>

        """
        let dir = TempDir()
        let ours = dir.file("ours", size: 4 << 20)
        let md = try ThinMetadata.restore(xml: Data(xml.utf8), storage: FileMetadataStorage(path: ours))
        try Oracle.check(ours)
        #expect(try md.dumpXML() == (try Oracle.dump(ours)))

        let theirs = dir.file("theirs", size: 4 << 20)
        try Oracle.restore(xml: xml, to: theirs)
        #expect(try ThinMetadata.open(storage: FileMetadataStorage(path: theirs)).dumpXML() == (try Oracle.dump(theirs)))
    }

    /// Mappings given out of order, as single blocks that form runs, and an
    /// overwritten block: the dump is canonical either way.
    @Test func nonCanonicalInput() throws {
        let xml = """
        <superblock uuid="" time="2" transaction="1" flags="0" version="2" data_block_size="256" nr_data_blocks="100">
          <device dev_id="3" mapped_blocks="4" transaction="1" creation_time="0" snap_time="0">
            <single_mapping origin_block="11" data_block="21" time="1"/>
            <single_mapping origin_block="10" data_block="20" time="1"/>
            <range_mapping origin_begin="0" data_begin="50" length="2" time="0"/>
          </device>
        </superblock>

        """
        let dir = TempDir()
        let ours = dir.file("ours", size: 4 << 20)
        let md = try ThinMetadata.restore(xml: Data(xml.utf8), storage: FileMetadataStorage(path: ours))
        try Oracle.check(ours)
        let dump = try Oracle.dump(ours)
        #expect(try md.dumpXML() == dump)
        #expect(dump.contains("<range_mapping origin_begin=\"10\" data_begin=\"20\" length=\"2\" time=\"1\"/>"))
        #expect(try md.check().isClean)
    }

    @Test(arguments: [
        "<superblock/>",                                                        // missing attributes
        "<superblock uuid=\"\" time=\"0\" transaction=\"0\" data_block_size=\"128\" nr_data_blocks=\"10\"><single_mapping origin_block=\"0\" data_block=\"1\" time=\"0\"/></superblock>",   // mapping outside a device
        "<superblock uuid=\"\" time=\"0\" transaction=\"0\" data_block_size=\"128\" nr_data_blocks=\"10\"><device dev_id=\"1\" mapped_blocks=\"1\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"><single_mapping origin_block=\"0\" data_block=\"10\" time=\"0\"/></device></superblock>",   // data block beyond the device
        "<superblock uuid=\"\" time=\"0\" transaction=\"0\" data_block_size=\"128\" nr_data_blocks=\"10\"><device dev_id=\"16777216\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"></device></superblock>",   // 25-bit device id
        "not xml at all",                                                       // not XML
        "<superblock uuid=\"\" time=\"0\" transaction=\"0\" data_block_size=\"128\" nr_data_blocks=\"10\"><device dev_id=\"1\" mapped_blocks=\"2\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"><range_mapping origin_begin=\"18446744073709551615\" data_begin=\"0\" length=\"2\" time=\"0\"/></device></superblock>",   // a range past the last virtual block
        "<superblock uuid=\"\" time=\"0\" transaction=\"0\" data_block_size=\"128\" nr_data_blocks=\"1099511627776\"></superblock>",   // 2^40 data blocks: beyond the 40-bit field
    ])
    func malformedInputIsRefused(_ xml: String) throws {
        let dir = TempDir()
        let path = dir.file("meta", size: 4 << 20)
        #expect(throws: (any Error).self) {
            _ = try ThinMetadata.restore(xml: Data(xml.utf8), storage: FileMetadataStorage(path: path))
        }
    }
}
