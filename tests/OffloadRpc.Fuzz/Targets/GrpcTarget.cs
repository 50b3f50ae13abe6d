using System.Buffers;
using System.Buffers.Binary;
using Grpc.Core;
using MessagePack;
using OffloadRpc.Grpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Fuzz.Targets;

/// <summary>
/// What either side of the gRPC transport reads from its peer: gRPC messages deserialized into frames
/// (the marshaller, in one piece or in segments, with and without filling a message's leases in place),
/// assembled into requests, replies and stream items (<see cref="MessageAssembler"/>, with and without a
/// server's budget); the one-frame shortcut (<see cref="Frame.WholeMessagePayloads"/>), checked against
/// the assembler on the same frame; and a server's Describe answer (<see cref="ServerDescription"/>).
/// Input: a flags byte (bit 0: fill in place; bit 1: a budget of 256 KiB; bit 5: lengths of 24 bits; bit 2: messages in segments of
/// 1 to 8 bytes; bits 3-4: assemble one message, several in a row (a stream's items, with credit frames
/// between them as a client reads them), the one-frame
/// shortcut, or Describe; bit 6: a reply whose result is a float[], its one payload read into the array;
/// bit 7: that payload taken as the array, not as a lease), then gRPC messages of [u16 or u24 length][bytes]. Every input ends in a message or a
/// <see cref="ProtocolViolationException"/> (<see cref="ArenaExhaustedException"/> past the budget), and
/// gives every lease and every byte of the budget back.
/// </summary>
internal sealed class GrpcTarget : FuzzTarget
{
    /// <summary>The body limit the assembler is given (OffloadRpcOptions.MaxMessageBytes, small here so that it is reached).</summary>
    private const int MaxBody = 4096;

    private const int Budget = 256 << 10;

    public override string Name => "grpc";

    public override string Description => "gRPC frames: the marshaller, message assembly, the one-frame shortcut, Describe";

    public override void Run(ReadOnlySpan<byte> input)
    {
        // In a context of its own: filling in place sets an async local, which must not reach the next input.
        byte[] data = input.ToArray();
        ExecutionContext context = ExecutionContext.Capture() ?? throw new InvalidOperationException("The flow is suppressed.");
        ExecutionContext.Run(context, static state => RunInContext((byte[])state!), data);
    }

    private static void RunInContext(byte[] data)
    {
        byte flags = data.Length > 0 ? data[0] : (byte)0;
        bool inPlace = (flags & 1) != 0;
        LeaseBudget? budget = (flags & 2) != 0 ? new LeaseBudget(Budget) : null;
        int segment = (flags & 4) != 0 ? 1 + (data.Length % 8) : 0;
        int mode = (flags >> 3) & 3;
        ArrayReceiver? arrays = (flags & 64) != 0 ? ArrayReceiver.For<float[]>() : null;
        bool takeArrays = (flags & 128) != 0;
        List<byte[]> messages = Messages(data.AsSpan(Math.Min(1, data.Length)), wide: (flags & 32) != 0);
        long leases = LocalLeases.Instance.OutstandingLeases;
        switch (mode)
        {
            case 0:
            case 1:
                Assemble(messages, segment, inPlace, budget, several: mode == 1, arrays, takeArrays);
                break;
            case 2:
                OneFrame(messages, segment, budget);
                break;
            default:
                Describe(messages, segment);
                break;
        }

        if (budget is { HeldBytes: not 0 } held)
        {
            throw new FuzzFailure($"{held.HeldBytes} bytes of the budget are still held after every message was disposed.");
        }

        // Only growth is a leak: a lease of an earlier test that a finalizer gives back meanwhile lowers the count.
        if (LocalLeases.Instance.OutstandingLeases > leases)
        {
            throw new FuzzFailure($"{LocalLeases.Instance.OutstandingLeases - leases} leases are still out after every message was disposed.");
        }
    }

    /// <summary>Frames fed to assemblers as gRPC reads them: a message that does not deserialize ends the call, as does one the assembler refuses.</summary>
    private static void Assemble(List<byte[]> messages, int segment, bool inPlace, LeaseBudget? budget, bool several, ArrayReceiver? arrays, bool takeArrays)
    {
        MessageAssembler? assembler = null;
        var received = new List<byte[]>(); // the current message's gRPC messages, as sent: what its payloads must hold
        try
        {
            foreach (byte[] message in messages)
            {
                Frame frame = Deserialize(message, segment);
                if (several && frame.Kind == FrameKind.Credit)
                {
                    // Among a streamed call's messages, as the client reads them: credit for its streamed argument.
                    if (Frame.ReadCredit(frame) <= 0)
                    {
                        throw new FuzzFailure("A credit frame was read as granting no items.");
                    }

                    continue;
                }

                if (assembler is null)
                {
                    assembler = new MessageAssembler(MaxBody, budget);
                    assembler.ReceiveArray(arrays);
                }

                received.Add(message);
                if (!assembler.Accept(frame))
                {
                    if (inPlace)
                    {
                        assembler.ReceiveInPlace();
                    }

                    continue;
                }

                CheckWhole(assembler, received, takeArrays);
                assembler.Dispose();
                assembler = null;
                received.Clear();
                if (!several)
                {
                    return; // a reply: what follows is not read
                }
            }
        }
        catch (ProtocolViolationException)
        {
        }
        catch (ArenaExhaustedException) when (budget is not null)
        {
        }
        finally
        {
            assembler?.Dispose();
        }
    }

    /// <summary>
    /// A whole message: its body within the limit, and every payload a lease of the length its head announced,
    /// holding, in order, the bytes sent after the head's length table and in the data frames (filled in place or not).
    /// </summary>
    private static void CheckWhole(MessageAssembler message, List<byte[]> sent, bool takeArrays)
    {
        if (message.Body.Length > MaxBody || message.PayloadCount > Frame.MaxPayloads)
        {
            throw new FuzzFailure($"A message of {message.Body.Length} body bytes and {message.PayloadCount} payloads was assembled past the limits.");
        }

        var expected = new List<byte>();
        expected.AddRange(sent[0].AsSpan(1 + 4 + message.Body.Length + 2 + (8 * message.PayloadCount)).ToArray());
        foreach (byte[] data in sent.Skip(1))
        {
            expected.AddRange(data.AsSpan(1).ToArray());
        }

        long total = 0;
        int first = 0;
        if (takeArrays && message.PayloadCount > 0 && message.TryTakeArray(0, out float[]? array))
        {
            // Read into the result's array: exactly its payload's bytes, and gone from the message once taken.
            byte[] bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(array.AsSpan()).ToArray();
            if (message.PayloadCount != 1 || !bytes.AsSpan().SequenceEqual(expected.ToArray()))
            {
                throw new FuzzFailure($"The array of a message of {message.PayloadCount} payloads holds other bytes than were sent for it.");
            }

            if (message.TryTakeArray(0, out float[]? _) || message.Take(0) is not null)
            {
                throw new FuzzFailure("The array was taken twice.");
            }

            total = bytes.Length;
            first = 1;
        }

        for (int i = first; i < message.PayloadCount; i++)
        {
            using SharedBuffer lease = message.Take(i) ?? throw new FuzzFailure($"Payload {i} of a whole message has no lease.");
            if (!lease.Span.SequenceEqual(expected.GetRange((int)total, lease.Length).ToArray()))
            {
                throw new FuzzFailure($"Payload {i} holds other bytes than were sent for it.");
            }

            total += lease.Length;
            if (message.Take(i) is not null)
            {
                throw new FuzzFailure($"Payload {i} was taken twice.");
            }
        }

        if (total != message.PayloadBytes || total != expected.Count)
        {
            throw new FuzzFailure($"The payloads hold {total} bytes, the head announced {message.PayloadBytes}, {expected.Count} were sent.");
        }
    }

    /// <summary>The first message as a served call or a reply sees it: the one-frame shortcut must say whole exactly when the assembler, given the same frame, completes a request or reply (a head of kind Head), and both must read the same body and payloads.</summary>
    private static void OneFrame(List<byte[]> messages, int segment, LeaseBudget? budget)
    {
        if (messages.Count == 0)
        {
            return;
        }

        Frame frame;
        try
        {
            frame = Deserialize(messages[0], segment);
        }
        catch (ProtocolViolationException)
        {
            return;
        }

        int count = frame.WholeMessagePayloads(MaxBody);
        byte[]? body = null;
        var payloads = new List<byte[]>();
        if (count >= 0)
        {
            body = frame.WholeBody.ToArray();
            long bytes = 0;
            for (int i = 0; i < count; i++)
            {
                payloads.Add(frame.WholePayload(i).ToArray());
                bytes += payloads[i].Length;
            }

            if (bytes != frame.WholePayloadBytes)
            {
                throw new FuzzFailure($"The one-frame shortcut reads {bytes} payload bytes, and counts {frame.WholePayloadBytes}.");
            }
        }

        using var assembler = new MessageAssembler(MaxBody, budget);
        bool whole;
        try
        {
            whole = assembler.Accept(frame) && assembler.HeadKind == FrameKind.Head; // the shortcut is for requests and replies; callers check the kind of an assembled head
        }
        catch (ProtocolViolationException) when (count < 0)
        {
            return;
        }
        catch (ArenaExhaustedException) when (budget is not null)
        {
            return;
        }
        catch (Exception ex) when (count >= 0)
        {
            throw new FuzzFailure($"The one-frame shortcut takes a frame as a whole message of {count} payloads, which the assembler refuses.", ex);
        }

        if (whole != count >= 0)
        {
            throw new FuzzFailure(whole ? "The assembler completes a message from one frame that the one-frame shortcut refuses." : $"The one-frame shortcut takes a frame as a whole message of {count} payloads, which the assembler does not complete.");
        }

        if (!whole)
        {
            return;
        }

        if (!assembler.Body.Span.SequenceEqual(body) || assembler.PayloadCount != count)
        {
            throw new FuzzFailure("The one-frame shortcut and the assembler read different bodies or payload counts from one frame.");
        }

        for (int i = 0; i < count; i++)
        {
            using SharedBuffer lease = assembler.Take(i)!;
            if (!lease.Span.SequenceEqual(payloads[i]))
            {
                throw new FuzzFailure($"The one-frame shortcut and the assembler read different bytes for payload {i}.");
            }
        }
    }

    /// <summary>A server's answer to Describe, read by a client before it trusts anything of the server.</summary>
    private static void Describe(List<byte[]> messages, int segment)
    {
        if (messages.Count == 0)
        {
            return;
        }

        try
        {
            Frame answer = Deserialize(messages[0], segment);
            try
            {
                ServerDescription.Decode(answer.First);
            }
            finally
            {
                answer.Release();
            }
        }
        catch (ProtocolViolationException)
        {
        }
    }

    /// <summary>A gRPC message through the transport's marshaller, as gRPC hands it over: in one piece, or in segments of <paramref name="segment"/> bytes.</summary>
    private static Frame Deserialize(byte[] message, int segment) =>
        Frame.Marshaller.ContextualDeserializer(new Context(segment == 0 ? new ReadOnlySequence<byte>(message) : Segments(message, segment)));

    private static ReadOnlySequence<byte> Segments(byte[] message, int size)
    {
        if (message.Length <= size)
        {
            return new ReadOnlySequence<byte>(message);
        }

        var first = new Segment(message.AsMemory(0, size), 0);
        Segment last = first;
        for (int offset = size; offset < message.Length; offset += size)
        {
            last = last.Append(message.AsMemory(offset, Math.Min(size, message.Length - offset)));
        }

        return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
    }

    /// <summary>The gRPC messages: [u16 length][bytes], or with <paramref name="wide"/> [u24 length][bytes] (a head above 64 KiB, which a server charges to its budget).</summary>
    private static List<byte[]> Messages(ReadOnlySpan<byte> rest, bool wide)
    {
        var messages = new List<byte[]>();
        var input = new FuzzInput(rest);
        while (!input.IsEmpty && messages.Count < 64)
        {
            int length = wide ? input.UInt16() | (input.Byte() << 16) : input.UInt16();
            messages.Add(input.Bytes(Math.Min(length, input.Remaining)).ToArray());
        }

        return messages;
    }

    public override IEnumerable<(string Name, byte[] Data)> Seeds()
    {
        byte[] result = MessagePackSerializer.Serialize(42);
        byte[] body = MessagePackSerializer.Serialize(new object[] { 7, "frame" });
        byte[] small = Pattern(300, 1);
        byte[] large = Pattern(100_000, 2);
        yield return ("reply", Input(0, Head(FrameKind.Head, result, [])));
        yield return ("reply-inline-payload", Input(0, Head(FrameKind.Head, body, [small], small)));
        yield return ("reply-chunked-payload", Input(0, [Head(FrameKind.Head, body, [large]), .. Data(large, 60_000)]));
        yield return ("reply-chunked-in-place", Input(1, [Head(FrameKind.Head, body, [large]), .. Data(large, 60_000)]));
        yield return ("request-budget", Input(2 | 4, [Head(FrameKind.Head, body, [large, small]), .. Data([.. large, .. small], 40_000)]));
        yield return ("request-past-budget", Input(2, [Head(FrameKind.Head, body, [Pattern(300_000, 3)]), .. Data(Pattern(300_000, 3), 60_000)]));
        byte[] wideInline = Pattern(90_000, 4);
        yield return ("large-head-charged", Input(2 | 32, Head(FrameKind.Head, body, [wideInline], wideInline)));
        yield return ("large-head-past-budget", Input(2 | 32, Head(FrameKind.Head, body, [Pattern(300_000, 5)], Pattern(300_000, 5))));
        yield return ("large-head-unbudgeted", Input(32 | 1, [Head(FrameKind.Head, body, [wideInline, large], wideInline), .. Data(large, 60_000)]));
        yield return ("empty-payloads", Input(0, Head(FrameKind.Head, body, [[], small, []], small)));
        byte[] floats = Pattern(100_000, 6); // 25,000 floats
        yield return ("reply-array", Input(64 | 128 | 1, [Head(FrameKind.Head, result, [floats]), .. Data(floats, 60_000)]));
        yield return ("reply-array-as-lease", Input(64 | 2, [Head(FrameKind.Head, result, [floats]), .. Data(floats, 60_000)]));
        yield return ("reply-array-odd-length", Input(64 | 128 | 2, Head(FrameKind.Head, result, [small[..10]], small[..10])));
        yield return ("items", Input(1 << 3, Head(FrameKind.ItemHead, result, []), Head(FrameKind.ItemHead, body, [small], small), Head(FrameKind.Head, result, [])));
        yield return ("items-chunked", Input((1 << 3) | 1, [Head(FrameKind.ItemHead, body, [large]), .. Data(large, 50_000), Head(FrameKind.Head, result, [])]));
        yield return ("one-frame", Input(2 << 3, Head(FrameKind.Head, body, [small, small], [.. small, .. small])));
        yield return ("one-frame-short", Input(2 << 3, Head(FrameKind.Head, body, [small], small[..100])));
        yield return ("credit", Input(1 << 3, [(byte)FrameKind.Credit, 8, 0, 0, 0]));
        var description = new ServerDescription { BootId = "3d0f7b2a-0e43-4d4b-9c3e-1c7a5f0e9b11", UserId = 1000, ProcessId = 4242, SocketPath = "/run/user/1000/offloadrpc/imagesvc", Contracts = { ["OffloadRpc.TestContracts.IImageService"] = 0x1234_5678_9ABC_DEF0UL } };
        yield return ("describe", Input(3 << 3, [(byte)FrameKind.Head, .. description.Encode()]));
        yield return ("describe-segments", Input((3 << 3) | 4, [(byte)FrameKind.Head, .. description.Encode()]));
    }

    /// <summary>A head frame: [kind][u32 body length][body][u16 count][i64 length per payload][payload bytes that ride in it].</summary>
    private static byte[] Head(FrameKind kind, byte[] body, byte[][] payloads, byte[]? inline = null)
    {
        var head = new List<byte> { (byte)kind };
        Span<byte> number = stackalloc byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(number, (uint)body.Length);
        head.AddRange(number[..4].ToArray());
        head.AddRange(body);
        BinaryPrimitives.WriteUInt16LittleEndian(number, (ushort)payloads.Length);
        head.AddRange(number[..2].ToArray());
        foreach (byte[] payload in payloads)
        {
            BinaryPrimitives.WriteInt64LittleEndian(number, payload.Length);
            head.AddRange(number.ToArray());
        }

        head.AddRange(inline ?? []);
        return [.. head];
    }

    private static IEnumerable<byte[]> Data(byte[] bytes, int chunk)
    {
        for (int offset = 0; offset < bytes.Length; offset += chunk)
        {
            yield return [(byte)FrameKind.Data, .. bytes.AsSpan(offset, Math.Min(chunk, bytes.Length - offset))];
        }
    }

    private static byte[] Pattern(int length, int seed)
    {
        byte[] bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }

    /// <summary>An input: the flags, then each message after its length (24 bits with flag bit 5, else 16).</summary>
    private static byte[] Input(int flags, params byte[][] messages)
    {
        var input = new List<byte> { (byte)flags };
        foreach (byte[] message in messages)
        {
            input.Add((byte)message.Length);
            input.Add((byte)(message.Length >> 8));
            if ((flags & 32) != 0)
            {
                input.Add((byte)(message.Length >> 16));
            }

            input.AddRange(message);
        }

        return [.. input];
    }

    private sealed class Context(ReadOnlySequence<byte> payload) : DeserializationContext
    {
        public override int PayloadLength => (int)payload.Length;

        public override byte[] PayloadAsNewBuffer() => payload.ToArray();

        public override ReadOnlySequence<byte> PayloadAsReadOnlySequence() => payload;
    }

    private sealed class Segment : ReadOnlySequenceSegment<byte>
    {
        public Segment(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public Segment Append(ReadOnlyMemory<byte> memory)
        {
            var next = new Segment(memory, RunningIndex + Memory.Length);
            Next = next;
            return next;
        }
    }
}
