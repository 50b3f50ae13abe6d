using System.Runtime.InteropServices;

namespace OffloadRpc.Transport;

/// <summary>Wire constants shared by both sides: socket frame types, ring message kinds, slot layout.</summary>
internal static class TransportProtocol
{
    /// <summary>Bumped whenever the socket frames, the control-area layout or the slot layout change.</summary>
    public const int Version = 1;

    public const uint HelloMagic = 0x4F52_5043; // "ORPC"

    /// <summary>Most payload references one message may carry (its body, when it overflows the slot, takes one).</summary>
    public const int MaxPayloadsPerMessage = 16;

    /// <summary>Largest single payload: a lease's Memory/Span is int-indexed.</summary>
    public const long MaxPayloadLength = int.MaxValue;
}

/// <summary>Ring message kinds.</summary>
internal enum MessageKind : ushort
{
    /// <summary>A call: method id, body, payloads.</summary>
    Request = 1,

    /// <summary>A call's result.</summary>
    Response = 2,

    /// <summary>A call's remote exception (type, message, stack).</summary>
    Fault = 3,

    /// <summary>The caller gave up on a call: its token on the server fires.</summary>
    Cancel = 4,

    /// <summary>
    /// One item of a stream, keyed by the call's id: body and payloads as a reply's. From the server for a
    /// streamed result (the stream ends with the call's Response or Fault), from the client for a streamed
    /// argument (it ends with <see cref="StreamEnd"/> or <see cref="StreamFault"/>).
    /// </summary>
    StreamItem = 5,

    /// <summary>The consumer of a stream took <see cref="MessageHeader.MethodId"/> more items: the producer may send that many more. No body.</summary>
    StreamCredit = 6,

    /// <summary>The client's streamed argument has no more items. No body.</summary>
    StreamEnd = 7,

    /// <summary>The client's streamed argument failed: the body is a fault (type, message, stack), as in <see cref="Fault"/>.</summary>
    StreamFault = 8,
}

[Flags]
internal enum MessageFlags : ushort
{
    None = 0,

    /// <summary>The body did not fit in the slot: payload reference 0 holds it.</summary>
    BodyInPayload = 1,

    /// <summary>
    /// Requests only: the body starts with a call metadata block (a little-endian u32 length, then the
    /// block: headers, deadline, W3C trace context; see Internal.CallMetadata); the arguments follow it.
    /// </summary>
    HasMetadata = 4,
}

/// <summary>The fixed head of a message slot (32 bytes). Read once into a local copy, then validated.</summary>
[StructLayout(LayoutKind.Sequential, Pack = 1, Size = 32)]
internal struct MessageHeader
{
    public const int Size = 32;

    public long Sequence;
    public ulong CallId;
    public MessageKind Kind;
    public MessageFlags Flags;
    public int MethodId;
    public int BodyLength;
    public ushort PayloadCount;
    public ushort Reserved;
}

/// <summary>A reference to a payload in one side's arena (24 bytes).</summary>
[StructLayout(LayoutKind.Sequential, Pack = 1, Size = 24)]
internal struct PayloadRef
{
    public const int Size = 24;

    /// <summary>The block belongs to the receiver of the message (a lease sent back), not to its sender.</summary>
    public const uint ReceiverOwned = 1;

    /// <summary>
    /// The payload is still being written when the message is published: the block starts with a
    /// <see cref="PipelineHeader"/> whose progress the receiver follows; the data starts after it.
    /// </summary>
    public const uint Pipelined = 2;

    /// <summary>
    /// With <see cref="Pipelined"/>: a payload sent through a ring (a Stream argument). <see cref="Length"/>
    /// is the capacity of the ring after the header: the sender writes at
    /// <see cref="PipelineHeader.BytesReady"/> modulo it, never more than the capacity past what the
    /// receiver has taken (<see cref="PipelineHeader.BytesConsumed"/>), and marks the end by setting
    /// <see cref="PipelineHeader.Total"/> (-1 until then) to the final byte count.
    /// </summary>
    public const uint Streamed = 4;

    /// <summary>
    /// With <see cref="Streamed"/>: the sender knew the length up front (a seekable Stream) and wrote it to
    /// <see cref="PipelineHeader.Announced"/>; it writes exactly that many bytes and the end it marks is that
    /// length. Without it the length is unknown until the end (a Stream that cannot seek).
    /// </summary>
    public const uint LengthAnnounced = 8;

    public int SegmentId;
    public uint Flags;
    public long Offset;
    public long Length;
}
