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
}
