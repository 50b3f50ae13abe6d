using System.Buffers.Binary;
using OffloadRpc;
using OffloadRpc.Interop;
using OffloadRpc.Transport;

/// <summary>Writes raw, deliberately broken slots and frames, as a malicious or buggy peer would.</summary>
internal static unsafe class RawWriter
{
    public static void WriteMessage(RpcConnection connection, MessageKind kind, ulong callId, int bodyLength, ReadOnlySpan<PayloadRef> refs, bool corruptSequence = false)
    {
        byte* slot = connection.ReserveRawSlot(out long position);
        var header = (MessageHeader*)slot;
        header->CallId = callId;
        header->Kind = kind;
        header->Flags = MessageFlags.None;
        header->MethodId = 1;
        header->BodyLength = bodyLength;
        header->PayloadCount = (ushort)refs.Length;
        header->Reserved = 0;
        refs.CopyTo(new Span<PayloadRef>(slot + MessageHeader.Size, refs.Length));
        if (corruptSequence)
        {
            Interlocked.Exchange(ref *(long*)slot, position + 12345);
            connection.WakePeerConsumer();
        }
        else
        {
            connection.PublishRawSlot(position);
        }
    }

    public static void PostRelease(RpcConnection connection, ulong handle)
    {
        ControlRing ring = connection.OutboundArea.Releases;
        byte* slot = ring.TryReserve(out long position);
        *(ulong*)(slot + 8) = handle;
        ring.Publish(position);
    }

    /// <summary>Hands over a memfd with the given seals (or none) as segment <paramref name="id"/>.</summary>
    public static void SendSegment(RpcConnection connection, int id, long size, long announcedSize, int seals)
    {
        using SafeMemfdHandle fd = LinuxNative.MemfdCreateHandle("evil", LinuxNative.MFD_CLOEXEC | LinuxNative.MFD_ALLOW_SEALING);
        LinuxNative.Ftruncate(fd, size);
        if (seals != 0)
        {
            LinuxNative.Fcntl(fd, LinuxNative.F_ADD_SEALS, seals);
        }

        Span<byte> frame = stackalloc byte[12];
        BinaryPrimitives.WriteInt32LittleEndian(frame, id);
        BinaryPrimitives.WriteInt64LittleEndian(frame[4..], announcedSize);
        connection.Channel.Send(FrameType.AddSegment, frame, fd, TimeSpan.FromSeconds(10));
    }
}

internal static class EvilClient
{
    public static async Task<int> RunAsync(string endpoint, TransportOptions options, string kind)
    {
        RpcConnection connection = await Handshake.ConnectAsync(endpoint, options, [], null, CancellationToken.None);

        // A legitimate call first, so that segment 1 exists and the server has lent nothing.
        using (RpcReply reply = await connection.CallAsync(1, "warm-up"u8, [OutboundPayload.Copy(new byte[4096])]))
        {
        }

        switch (kind)
        {
            case "corrupt-seq":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [], corruptSequence: true);
                break;
            case "corrupt-offset":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = 1, Offset = 1L << 40, Length = 4096 }]);
                break;
            case "overlong-payload":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = 1, Offset = 0, Length = 1L << 36 }]);
                break;
            case "unknown-segment":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = 77, Offset = 0, Length = 64 }]);
                break;
            case "body-length":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 100_000, []);
                break;
            case "payload-count":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, new PayloadRef[17]);
                break;
            case "bad-kind":
                RawWriter.WriteMessage(connection, (MessageKind)99, 1, 0, []);
                break;
            case "stray-response":
                RawWriter.WriteMessage(connection, MessageKind.Response, 5, 0, []);
                break;
            case "bad-release":
                RawWriter.PostRelease(connection, PayloadArena.MakeHandle(1, 0));
                // A message wakes the server's receive thread, which drains releases after it.
                _ = connection.CallAsync(1, "wake"u8, default).AsTask();
                break;
            case "pipelined-overrun":
            {
                // A pipelined payload whose progress claims more bytes than it announced.
                unsafe
                {
                    SharedBuffer lease = connection.Rent(4096);
                    var header = (PipelineHeader*)(lease.Segment.Base + lease.Offset);
                    header->Total = 1024;
                    header->BytesReady = 1 << 30;
                    RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = lease.Segment.Id, Flags = PayloadRef.Pipelined, Offset = lease.Offset, Length = 1024 }]);
                }

                break;
            }

            case "pipelined-stall":
            {
                // A pipelined payload whose sender stays alive but stops writing after the first 4 KiB.
                unsafe
                {
                    SharedBuffer lease = connection.Rent(64 << 10);
                    var header = (PipelineHeader*)(lease.Segment.Base + lease.Offset);
                    header->Total = 32 << 10;
                    header->BytesReady = 4096;
                    RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = lease.Segment.Id, Flags = PayloadRef.Pipelined, Offset = lease.Offset, Length = 32 << 10 }]);
                }

                break;
            }

            case "unsealed-segment":
                RawWriter.SendSegment(connection, 50, 1 << 20, 1 << 20, seals: 0);
                break;
            case "shrinkable-segment":
                RawWriter.SendSegment(connection, 50, 1 << 20, 1 << 20, seals: LinuxNative.F_SEAL_GROW);
                break;
            case "missized-segment":
                RawWriter.SendSegment(connection, 50, 1 << 20, 2 << 20, seals: SharedMemorySegment.RequiredSeals);
                break;
            default:
                Console.WriteLine($"unknown kind {kind}");
                return 2;
        }

        Console.WriteLine("SENT");
        Task closed = connection.Completion;
        if (await Task.WhenAny(closed, Task.Delay(TimeSpan.FromSeconds(20))) == closed)
        {
            Console.WriteLine($"CLOSED {connection.TerminalException?.GetType().FullName}");
        }
        else
        {
            Console.WriteLine("STILL-OPEN");
        }

        await connection.DisposeAsync();
        return 0;
    }
}

/// <summary>A server that answers the first request with a broken response.</summary>
internal sealed class EvilHandler : IRequestHandler
{
    private readonly string _kind;

    public EvilHandler(string kind) => _kind = kind;

    public ValueTask HandleAsync(IncomingCall call)
    {
        switch (_kind)
        {
            case "bad-offset-response":
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId, 0, [new PayloadRef { SegmentId = 1, Offset = 1L << 40, Length = 64 }]);
                break;
            case "corrupt-seq-response":
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId, 0, [], corruptSequence: true);
                break;
            case "wrong-call-response":
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId ^ (1UL << 40), 0, []);
                break;
            case "duplicate-response":
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId, 0, []);
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId, 0, []);
                break;
            case "malformed-fault":
                RawWriter.WriteMessage(call.Connection, MessageKind.Fault, call.CallId, 3, []);
                break;
            default:
                throw new NotSupportedException(_kind);
        }

        // Stop the transport from answering properly afterwards.
        return new ValueTask(Task.Delay(Timeout.Infinite));
    }
}
