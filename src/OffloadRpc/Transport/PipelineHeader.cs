using System.Runtime.InteropServices;

namespace OffloadRpc.Transport;

/// <summary>
/// The first 64 bytes of a pipelined payload block. The sender publishes the message first and then
/// writes the data chunk by chunk, each time raising <see cref="BytesReady"/> (release) and bumping
/// <see cref="ChunksReady"/>, the futex word a waiting receiver sleeps on. The receiver never trusts
/// the header: it reads each field once, checks it against the payload length it was given and
/// against what it read before (progress only grows).
/// </summary>
[StructLayout(LayoutKind.Explicit, Size = Size)]
internal struct PipelineHeader
{
    public const int Size = 64;

    [FieldOffset(0)]
    public long Total;

    [FieldOffset(8)]
    public long BytesReady;

    [FieldOffset(16)]
    public int ChunksReady;

    [FieldOffset(20)]
    public int ReceiverWaiting;

    // A streamed payload's ring (PayloadRef.Streamed) only: the receiver's side, which the sender
    // checks the same way (what was taken only grows and never passes what was written).

    /// <summary>Bytes the receiver has taken (and will not read again): the sender may reuse their room.</summary>
    [FieldOffset(24)]
    public long BytesConsumed;

    /// <summary>Bumped by the receiver after raising <see cref="BytesConsumed"/> or setting <see cref="ReaderClosed"/>: the futex word a sender waiting for room sleeps on.</summary>
    [FieldOffset(32)]
    public int ConsumedCount;

    /// <summary>Set by a sender that sleeps on <see cref="ConsumedCount"/>.</summary>
    [FieldOffset(36)]
    public int SenderWaiting;

    /// <summary>Set by the receiver when it will read no more (its stream was disposed): the sender stops.</summary>
    [FieldOffset(40)]
    public int ReaderClosed;

    /// <summary>A streamed payload with <see cref="PayloadRef.LengthAnnounced"/>: the bytes the sender will write in all (written before the message is published; the receiver reads it once).</summary>
    [FieldOffset(48)]
    public long Announced;
}
