using MessagePack;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Fuzz.Targets;

/// <summary>
/// The generated server stubs' argument decoding (IFuzzContract: arrays of structs and strings, nested
/// and recursive types, maps; and the test contracts): a request with a fuzzed MessagePack body and
/// payloads goes through the real receiver and dispatcher to the stub. Beyond documented failures, a
/// decode that allocates far more than the body holds is a finding (the amplification bound).
/// Input: a method selector byte, a flags byte (bit 0: the body goes in the arena; bits 1-3: payload
/// count), a u16 length per payload, then the body.
/// </summary>
internal sealed class StubTarget : FuzzTarget
{
    public override string Name => "stub";

    public override string Description => "generated server stubs decoding MessagePack arguments and payload indexes";

    public override void Run(ReadOnlySpan<byte> data)
    {
        var input = new FuzzInput(data);
        MethodDescriptor method = ConnectionRig.Methods[input.Byte() % ConnectionRig.Methods.Count];
        using var rig = new ConnectionRig(serve: true);
        long before = GC.GetTotalAllocatedBytes(precise: true);
        int bodyLength = PlacedMessage.Write(rig, ref input, MessageKind.Request, 1, method.Id);
        rig.Poll();
        RingTarget.WaitForHandlers(rig);
        rig.Poll();
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        Verdict.CheckTerminal(rig.Connection.TerminalException, method.Name);
        PlacedMessage.CheckAllocation(allocated, bodyLength, method.Name);
    }

    public override IEnumerable<(string Name, byte[] Data)> Seeds()
    {
        // Each method called through its generated proxy: the request exactly as a client sends it.
        for (int i = 0; i < ConnectionRig.Methods.Count; i++)
        {
            MethodDescriptor method = ConnectionRig.Methods[i];
            if (PlacedMessage.Capture(method) is { } request)
            {
                yield return (method.Name, PlacedMessage.Input(i, bodyInArena: false, request.PayloadLengths, request.Body));
            }
        }

        int samples = Index(nameof(IFuzzContract.CountSamplesAsync));
        int words = Index(nameof(IFuzzContract.CountWordsAsync));
        int node = Index(nameof(IFuzzContract.EchoNodeAsync));
        // A declared array of two billion structs or strings in six bytes: refused before anything is allocated.
        yield return ("samples-declared-huge", PlacedMessage.Input(samples, false, [], [0x91, 0xDD, 0x7F, 0xFF, 0xFF, 0xFF]));
        yield return ("words-declared-huge", PlacedMessage.Input(words, false, [], [0x92, 0xDD, 0x7F, 0xFF, 0xFF, 0xFF, 0x90]));
        // The most a body can amplify: every byte an empty struct (32 bytes each).
        byte[] many = new byte[4 + 20_000];
        many[0] = 0x91;
        many[1] = 0xDC;
        many[2] = 20_000 >> 8;
        many[3] = 20_000 & 0xFF;
        many.AsSpan(4).Fill(0x90);
        yield return ("samples-empty-structs", PlacedMessage.Input(samples, true, [], many));
        // Nodes nested deeper than MessagePack's untrusted-data limit.
        var deep = new List<byte> { 0x91 };
        for (int i = 0; i < 600; i++)
        {
            deep.AddRange([0x93, 0xC0, 0x90, 0x91]);
        }

        yield return ("node-deep", PlacedMessage.Input(node, true, [], [.. deep]));
        yield return ("node-map-of-arrays", PlacedMessage.Input(node, false, [], MessagePackSerializer.Serialize(
            new object[] { new Node { Name = "n", Tags = new() { ["a"] = [1, 2], ["b"] = [] }, Children = [new Node()] } }, ConnectionRig.Serializer.Options)));
        // A node with a fifth, unknown element: MessagePack skips it, and its Skip takes an array32 count of 2^31 or more for none.
        yield return ("node-skip-huge-array", PlacedMessage.Input(node, false, [], [0x91, 0x95, 0xC0, 0x90, 0xC0, 0xC0, 0xDD, 0x80, 0x00, 0x00, 0x00, 0x01]));
        yield return ("wrong-argument-count", PlacedMessage.Input(samples, false, [], [0x93, 0x90, 0x90, 0x90]));
        yield return ("payload-index-out-of-range", PlacedMessage.Input(Index(nameof(IFuzzContract.MixedAsync)), false, [8], [0x96, 0x01, 0xC0, 0x05, 0x00, 0xC0, 0x80]));
    }

    private static int Index(string name) => ConnectionRig.Methods.ToList().FindIndex(m => m.Name == name);
}

/// <summary>A message whose body and payloads come from the fuzz input, placed as a peer places them (inline, or in its arena).</summary>
internal static class PlacedMessage
{
    /// <summary>A decode may allocate this much per byte of body (an empty struct or object per byte, plus growth) and a fixed amount besides.</summary>
    public const int AllowedBytesPerBodyByte = 160;

    public const long AllowedFixedBytes = 2 << 20;

    /// <summary>Writes the message described by the rest of <paramref name="input"/>; returns the body's length.</summary>
    public static int Write(ConnectionRig rig, ref FuzzInput input, MessageKind kind, ulong callId, int methodId)
    {
        int flags = input.Byte();
        bool bodyInArena = (flags & 1) != 0;
        int count = (flags >> 1) & 7;
        Span<int> lengths = stackalloc int[count];
        for (int i = 0; i < count; i++)
        {
            lengths[i] = input.UInt16();
        }

        ReadOnlySpan<byte> body = input.Rest();
        var refs = new List<PayloadRef>();
        long offset = 0;
        if (bodyInArena || MessageHeader.Size + ((count) * PayloadRef.Size) + body.Length > ConnectionRig.Options.SlotSize)
        {
            body = body[..Math.Min(body.Length, ConnectionRig.PeerSegmentSize / 2)];
            rig.WritePeer(0, body);
            refs.Add(new PayloadRef { SegmentId = ConnectionRig.PeerSegmentId, Offset = 0, Length = body.Length });
            offset = PayloadArena.RoundUp(body.Length);
            bodyInArena = true;
        }

        byte[] pattern = new byte[256];
        for (int i = 0; i < pattern.Length; i++)
        {
            pattern[i] = (byte)(i * 7);
        }

        for (int i = 0; i < count; i++)
        {
            long length = Math.Min(lengths[i], Math.Max(0, ConnectionRig.PeerSegmentSize - offset));
            for (long at = 0; at < length; at += pattern.Length)
            {
                rig.WritePeer(offset + at, pattern.AsSpan(0, (int)Math.Min(pattern.Length, length - at)));
            }

            refs.Add(new PayloadRef { SegmentId = ConnectionRig.PeerSegmentId, Offset = offset, Length = length });
            offset = Math.Min(ConnectionRig.PeerSegmentSize, offset + PayloadArena.RoundUp(length));
        }

        rig.WriteMessage(kind, callId, methodId, bodyInArena ? MessageFlags.BodyInPayload : MessageFlags.None, bodyInArena ? [] : body, [.. refs]);
        return body.Length;
    }

    private static readonly bool s_verbose = Environment.GetEnvironmentVariable("OFFLOADRPC_FUZZ_VERBOSE") == "1";

    public static void CheckAllocation(long allocated, int bodyLength, string where)
    {
        if (s_verbose)
        {
            Console.WriteLine($"  {where}: {bodyLength}-byte body, {allocated} bytes allocated");
        }

        long allowed = AllowedFixedBytes + ((long)AllowedBytesPerBodyByte * bodyLength);
        if (allocated > allowed)
        {
            throw new FuzzFailure($"{where}: decoding a {bodyLength}-byte body allocated {allocated} bytes (allowed {allowed}).");
        }
    }

    public static byte[] Input(int selector, bool bodyInArena, int[] payloadLengths, byte[] body)
    {
        var writer = new InputWriter().Byte(selector).Byte((bodyInArena ? 1 : 0) | (payloadLengths.Length << 1));
        foreach (int length in payloadLengths)
        {
            writer.UInt16(length);
        }

        return writer.Bytes(body).ToArray();
    }

    /// <summary>The request a generated proxy sends for <paramref name="method"/> with harmless arguments (null when its body is not inline).</summary>
    public static unsafe (byte[] Body, int[] PayloadLengths)? Capture(MethodDescriptor method)
    {
        using var rig = new ConnectionRig(serve: false);
        (byte[] Body, int[] PayloadLengths)? captured = null;
        rig.OnRequest = address =>
        {
            byte* slot = (byte*)address;
            var header = (MessageHeader*)slot;
            if (header->MethodId != method.Id || (header->Flags & MessageFlags.BodyInPayload) != 0)
            {
                return;
            }

            var refs = new ReadOnlySpan<PayloadRef>(slot + MessageHeader.Size, header->PayloadCount);
            int[] lengths = new int[refs.Length];
            for (int i = 0; i < refs.Length; i++)
            {
                lengths[i] = (int)refs[i].Length;
            }

            captured = (new ReadOnlySpan<byte>(slot + MessageHeader.Size + (refs.Length * PayloadRef.Size), header->BodyLength).ToArray(), lengths);
        };
        Task<object?> call = ProxyCalls.Start(rig.Connection, method);
        for (int i = 0; i < 200 && captured is null && !call.IsCompleted; i++)
        {
            rig.DrainOutbound();
            Thread.Sleep(1);
        }

        rig.DrainOutbound();
        _ = call.Exception;
        return captured;
    }
}
