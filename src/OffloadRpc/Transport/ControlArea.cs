using System.Runtime.InteropServices;

namespace OffloadRpc.Transport;

/// <summary>
/// The shared-memory control area of one direction of a connection, created by the side that sends
/// in that direction and mapped by both:
/// <code>
///   0    header: magic, version, geometry (informational; the handshake is authoritative)
///   64   consumer wake word   (the receiving side's poller sleeps here)
///   128  message-producer wake word (senders waiting for a free message slot)
///   192  release-producer wake word (receivers of payloads waiting to post a release)
///   256  release-consumer wake word (the arena owner waiting for space)
///   320  spin grant (written by the area's creator: whether the reader may spin for messages)
///   4096 message slots   [slotCount x slotSize]
///   ...  release slots   [releaseSlotCount x 16]
/// </code>
/// Each word sits on its own cache line. The area owns its segment (the owner's reference on the
/// mapping); the pointers it hands out are valid while that, or another reference, is held.
/// </summary>
internal sealed unsafe class ControlArea : IDisposable
{
    public const ulong Magic = 0x4145_5241_4350_5252; // "RRPCARAE"
    public const int HeaderSize = 4096;
    public const int ReleaseSlotSize = 16;

    public ControlArea(SharedMemorySegment segment, RingGeometry geometry)
    {
        long required = RequiredSize(geometry);
        if (segment.Size < required)
        {
            throw new ProtocolViolationException($"Control area of {segment.Size} bytes is smaller than its geometry needs ({required}).");
        }

        Segment = segment;
        Geometry = geometry;
        byte* b = segment.Pointer(0, required);
        ConsumerWake = (int*)(b + 64);
        MessageProducerWake = (int*)(b + 128);
        ReleaseProducerWake = (int*)(b + 192);
        ReleaseConsumerWake = (int*)(b + 256);
        SpinGrant = (int*)(b + 320);
        Messages = new ControlRing(b + HeaderSize, geometry.SlotSize, geometry.SlotCount, "message");
        Releases = new ControlRing(b + HeaderSize + (long)geometry.SlotSize * geometry.SlotCount, ReleaseSlotSize, geometry.ReleaseSlotCount, "release");
    }

    public SharedMemorySegment Segment { get; }

    public RingGeometry Geometry { get; }

    public int* ConsumerWake { get; }

    public int* MessageProducerWake { get; }

    public int* ReleaseProducerWake { get; }

    public int* ReleaseConsumerWake { get; }

    /// <summary>
    /// Non-zero while the reader of this area may spin waiting for its next message. A server writes it
    /// into the areas it sends on, so that no more of its clients spin at once than the cores hold (see
    /// <see cref="Poller"/>); a client only reads it. Advice, not a protocol field: a peer that ignores or
    /// rewrites it only changes its own latency.
    /// </summary>
    public int* SpinGrant { get; }

    public ControlRing Messages { get; }

    public ControlRing Releases { get; }

    public static long RequiredSize(RingGeometry geometry) =>
        HeaderSize + (long)geometry.SlotSize * geometry.SlotCount + (long)ReleaseSlotSize * geometry.ReleaseSlotCount;

    /// <summary>Creates and initializes a fresh area (the sending side's own).</summary>
    public static ControlArea Create(RingGeometry geometry, string name)
    {
        long size = (RequiredSize(geometry) + 4095) & ~4095L;
        SharedMemorySegment segment = SharedMemorySegment.Create(id: 0, size, name, populate: true);
        try
        {
            byte* b = segment.Base;
            *(ulong*)b = Magic;
            *(int*)(b + 8) = TransportProtocol.Version;
            *(int*)(b + 12) = geometry.SlotSize;
            *(int*)(b + 16) = geometry.SlotCount;
            *(int*)(b + 20) = geometry.ReleaseSlotCount;
            var area = new ControlArea(segment, geometry);
        *area.SpinGrant = 1; // granted until a server with several active clients decides otherwise
            area.Messages.InitializeSequences();
            area.Releases.InitializeSequences();
            return area;
        }
        catch
        {
            segment.Dispose();
            throw;
        }
    }

    /// <summary>Drops the owner's reference on the segment (and closes its memfd if still open); idempotent.</summary>
    public void Dispose() => Segment.Dispose();
}

/// <summary>The shape of a connection's rings; both sides use the same, fixed at the handshake.</summary>
[StructLayout(LayoutKind.Sequential)]
internal readonly record struct RingGeometry(int SlotSize, int SlotCount, int ReleaseSlotCount)
{
    /// <summary>Room for the header and the most payload references a message may carry (32 + 16 x 24, rounded to 64).</summary>
    public const int MinSlotSize = 448;
    public const int MaxSlotSize = 64 * 1024;
    public const int MaxSlotCount = 1 << 16;

    /// <summary>Why this geometry is unusable, or null when it is fine.</summary>
    public string? Validate()
    {
        if (SlotSize < MinSlotSize || SlotSize > MaxSlotSize || (SlotSize & 63) != 0)
        {
            return $"slot size {SlotSize} must be a multiple of 64 in [{MinSlotSize}, {MaxSlotSize}]";
        }

        if (SlotCount < 2 || SlotCount > MaxSlotCount || !IsPowerOfTwo(SlotCount))
        {
            return $"slot count {SlotCount} must be a power of two in [2, {MaxSlotCount}]";
        }

        if (ReleaseSlotCount < 2 || ReleaseSlotCount > MaxSlotCount * 4 || !IsPowerOfTwo(ReleaseSlotCount))
        {
            return $"release slot count {ReleaseSlotCount} must be a power of two in [2, {MaxSlotCount * 4}]";
        }

        return null;
    }

    private static bool IsPowerOfTwo(int value) => value > 0 && (value & (value - 1)) == 0;
}
