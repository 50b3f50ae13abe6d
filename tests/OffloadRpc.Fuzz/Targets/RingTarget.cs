using MessagePack;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Fuzz.Targets;

/// <summary>
/// Shared memory the peer writes: ring slots and their sequence words, message headers, payload
/// references (segment, offset, length, flags), bodies in the arena, pipeline headers, and release
/// handles, consumed by the connection's receiver (<see cref="RpcConnection.PollInbound"/>) and, for
/// requests, served by the generated stubs. Input: a config byte (bit 0: the connection serves; else it
/// is a client with one call waiting), then operations, each an op byte (mod 6) and its operands:
/// 0 message (u16 length, the slot after its sequence word), 1 release (u64 handle), 2 write the peer's
/// segment (u16 offset, u8 length, bytes), 3 poll, 4 overwrite a sequence word (u8 ring, u8 slot, i64),
/// 5 wait for running handlers.
/// </summary>
internal sealed unsafe class RingTarget : FuzzTarget
{
    private const int MaxOperations = 64;

    public override string Name => "ring";

    public override string Description => "ring slots, message headers, payload refs, pipeline headers and release handles, read by the connection's receiver";

    public override void Run(ReadOnlySpan<byte> data)
    {
        var input = new FuzzInput(data);
        bool serve = (input.Byte() & 1) != 0;
        using var rig = new ConnectionRig(serve);
        for (int operation = 0; operation < MaxOperations && !input.IsEmpty && !rig.Connection.IsClosed; operation++)
        {
            switch (input.Byte() % 6)
            {
                case 0:
                {
                    ReadOnlySpan<byte> slotBytes = input.Bytes(input.UInt16());
                    byte* slot = rig.ReserveMessage(out long position);
                    if (slot is null)
                    {
                        break;
                    }

                    int room = ConnectionRig.Options.SlotSize - sizeof(long);
                    var target = new Span<byte>(slot + sizeof(long), room);
                    target.Clear();
                    slotBytes[..Math.Min(slotBytes.Length, room)].CopyTo(target);
                    rig.Publish(position);
                    break;
                }

                case 1:
                {
                    ulong handle = (ulong)input.Int64();
                    if (!rig.WriteRelease(handle) && rig.Poll())
                    {
                        rig.WriteRelease(handle);
                    }

                    break;
                }

                case 2:
                {
                    int offset = input.UInt16();
                    rig.WritePeer(offset, input.Bytes(input.Byte()));
                    break;
                }

                case 3:
                    rig.Poll();
                    break;

                case 4:
                {
                    bool releases = (input.Byte() & 1) != 0;
                    int slot = input.Byte();
                    rig.WriteSequence(releases, slot, input.Int64());
                    break;
                }

                default:
                    WaitForHandlers(rig);
                    break;
            }
        }

        rig.Poll();
        WaitForHandlers(rig);
        rig.Poll();
        Verdict.CheckTerminal(rig.Connection.TerminalException, "PollInbound");
        CheckFirstCall(rig);
    }

    internal static void WaitForHandlers(ConnectionRig rig)
    {
        if (!rig.WaitForHandlers(TimeSpan.FromSeconds(5)))
        {
            throw new FuzzFailure("A served call did not finish within 5 s (a hang).");
        }
    }

    /// <summary>The call the client rig made: answered (its reply's payloads are taken and given back), or failed as documented.</summary>
    private static void CheckFirstCall(ConnectionRig rig)
    {
        Task<RpcReply> call = rig.FirstCall;
        if (!call.IsCompleted)
        {
            return;
        }

        if (call.IsCompletedSuccessfully)
        {
            using RpcReply reply = call.Result;
            _ = reply.Body.Length;
            for (int i = 0; i < reply.PayloadCount; i++)
            {
                SharedBuffer lease;
                try
                {
                    lease = reply.TakePayload(i);
                }
                catch (Exception ex)
                {
                    // A reply whose payload is not what a buffer may be (a ring, say) is refused when a decoder takes it;
                    // the reply's other payloads go back with it.
                    Verdict.Check(ex, e => e is ProtocolViolationException, "taking the reply's payloads");
                    return;
                }

                using (lease)
                {
                    _ = lease.Span.IndexOf((byte)0xFF);
                }
            }

            return;
        }

        Exception failure = call.Exception!.InnerException!;
        Verdict.Check(failure, e => e is RemoteInvocationException or ProtocolViolationException or PeerDisconnectedException or ObjectDisposedException, "the call's reply");
    }

    public override IEnumerable<(string Name, byte[] Data)> Seeds()
    {
        MethodDescriptor count = Method(nameof(IFuzzContract.CountSamplesAsync));
        MethodDescriptor mixed = Method(nameof(IFuzzContract.MixedAsync));
        byte[] countBody = MessagePackSerializer.Serialize(new object[] { new Sample[] { new() { X = 1, Tag = "a" }, default } }, ConnectionRig.Serializer.Options);
        byte[] mixedBody = MessagePackSerializer.Serialize(new object?[] { 7, "text", 0, 1, null, new Dictionary<string, Sample[]>() }, ConnectionRig.Serializer.Options);
        ulong firstCall = FirstCallId();
        var dataRef = new PayloadRef { SegmentId = ConnectionRig.PeerSegmentId, Offset = 0, Length = 100 };
        var copyRef = new PayloadRef { SegmentId = ConnectionRig.PeerSegmentId, Offset = 8192, Length = 10 };

        yield return ("request", Ops(serve: true, w => Message(w, MessageKind.Request, 1, count.Id, MessageFlags.None, countBody, [])));
        yield return ("request-payload", Ops(serve: true, w => Message(w, MessageKind.Request, 2, mixed.Id, MessageFlags.None, mixedBody, [dataRef, copyRef])));
        yield return ("request-body-in-arena", Ops(serve: true, w =>
        {
            Poke(w, 4096, countBody);
            Message(w, MessageKind.Request, 3, count.Id, MessageFlags.BodyInPayload, [], [new PayloadRef { SegmentId = ConnectionRig.PeerSegmentId, Offset = 4096, Length = countBody.Length }]);
        }));
        yield return ("request-pipelined", Ops(serve: true, w =>
        {
            Poke(w, 0, new InputWriter().Int64(100).Int64(100).Int32(1).Int32(0).ToArray());
            Message(w, MessageKind.Request, 4, mixed.Id, MessageFlags.None, mixedBody, [dataRef with { Flags = PayloadRef.Pipelined }, copyRef]);
        }));
        yield return ("request-pipelined-stalled", Ops(serve: true, w =>
        {
            Poke(w, 0, new InputWriter().Int64(100).Int64(10).Int32(1).Int32(0).ToArray());
            Message(w, MessageKind.Request, 4, mixed.Id, MessageFlags.None, mixedBody, [dataRef with { Flags = PayloadRef.Pipelined }, copyRef]);
        }));
        yield return ("request-returns-lent-block", Ops(serve: true, w =>
            Message(w, MessageKind.Request, 5, mixed.Id, MessageFlags.None, mixedBody, [new PayloadRef { SegmentId = 1, Flags = PayloadRef.ReceiverOwned, Offset = LentOffset(), Length = 200 }, copyRef])));
        yield return ("requests-wrap-the-ring", Ops(serve: true, w =>
        {
            for (int i = 0; i < 12; i++)
            {
                Message(w, MessageKind.Request, (ulong)(i % 8), count.Id, MessageFlags.None, countBody, []);
                if (i % 4 == 3)
                {
                    w.Byte(3);
                }
            }
        }));
        yield return ("cancel", Ops(serve: true, w =>
        {
            Message(w, MessageKind.Request, 6, count.Id, MessageFlags.None, countBody, []);
            Message(w, MessageKind.Cancel, 6, 0, MessageFlags.None, [], []);
        }));
        yield return ("release-lent-block", Ops(serve: false, w => w.Byte(1).Int64((long)LentHandle()).Byte(3)));
        yield return ("release-twice", Ops(serve: false, w => w.Byte(1).Int64((long)LentHandle()).Byte(1).Int64((long)LentHandle())));
        yield return ("response", Ops(serve: false, w => Message(w, MessageKind.Response, firstCall, 0, MessageFlags.None, [0xC0], [dataRef])));
        yield return ("fault", Ops(serve: false, w => Message(w, MessageKind.Fault, firstCall, 0, MessageFlags.None,
            new InputWriter().Int32(4).Bytes("Boom"u8).Int32(2).Bytes("no"u8).Int32(0).ToArray(), [])));
        yield return ("response-unknown-call", Ops(serve: false, w => Message(w, MessageKind.Response, firstCall + (1UL << 20), 0, MessageFlags.None, [], [])));
        yield return ("corrupt-sequence", Ops(serve: true, w => w.Byte(4).Byte(0).Byte(0).Int64(5).Byte(3)));
        yield return ("corrupt-release-sequence", Ops(serve: false, w => w.Byte(4).Byte(1).Byte(0).Int64(-3).Byte(3)));
    }

    private static ulong? s_firstCallId;
    private static ulong s_lentHandle;
    private static long s_lentOffset;

    /// <summary>The id of the rig's first call, the lent block's release handle and offset: deterministic for a fresh rig.</summary>
    private static void Probe()
    {
        if (s_firstCallId is null)
        {
            using var rig = new ConnectionRig(serve: false);
            s_firstCallId = rig.RequestIds[0];
            s_lentHandle = rig.LentHandle;
            s_lentOffset = rig.LentOffset;
        }
    }

    internal static ulong FirstCallId()
    {
        Probe();
        return s_firstCallId!.Value;
    }

    private static ulong LentHandle()
    {
        Probe();
        return s_lentHandle;
    }

    private static long LentOffset()
    {
        Probe();
        return s_lentOffset;
    }

    internal static MethodDescriptor Method(string name) => ConnectionRig.Methods.Single(m => m.Name == name);

    private static byte[] Ops(bool serve, Action<InputWriter> operations)
    {
        var writer = new InputWriter().Byte(serve ? 1 : 0);
        operations(writer);
        return writer.ToArray();
    }

    private static void Poke(InputWriter w, int offset, byte[] data) => w.Byte(2).UInt16(offset).Byte(data.Length).Bytes(data);

    /// <summary>A message operation: the slot's bytes after the sequence word.</summary>
    internal static void Message(InputWriter w, MessageKind kind, ulong callId, int methodId, MessageFlags flags, byte[] body, PayloadRef[] refs)
    {
        byte[] slot = SlotBytes(kind, callId, methodId, flags, body, refs);
        w.Byte(0).UInt16(slot.Length).Bytes(slot);
    }

    internal static byte[] SlotBytes(MessageKind kind, ulong callId, int methodId, MessageFlags flags, byte[] body, PayloadRef[] refs)
    {
        var slot = new InputWriter().Int64((long)callId).UInt16((int)kind).UInt16((int)flags).Int32(methodId).Int32(body.Length).UInt16(refs.Length).UInt16(0);
        foreach (PayloadRef reference in refs)
        {
            slot.Int32(reference.SegmentId).Int32((int)reference.Flags).Int64(reference.Offset).Int64(reference.Length);
        }

        return slot.Bytes(body).ToArray();
    }
}
