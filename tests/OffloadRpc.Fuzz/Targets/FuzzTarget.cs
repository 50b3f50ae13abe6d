using System.Buffers.Binary;

namespace OffloadRpc.Fuzz.Targets;

/// <summary>One parser of peer input, driven from a byte array.</summary>
internal abstract class FuzzTarget
{
    /// <summary>The name on the command line and of the corpus folder.</summary>
    public abstract string Name { get; }

    /// <summary>What the input drives.</summary>
    public abstract string Description { get; }

    /// <summary>Runs one input; throws (a <see cref="FuzzFailure"/>, or whatever escaped) only for a finding.</summary>
    public abstract void Run(ReadOnlySpan<byte> input);

    /// <summary>Small valid inputs and a few edge cases: the checked-in seed corpus.</summary>
    public abstract IEnumerable<(string Name, byte[] Data)> Seeds();

    public static IReadOnlyList<FuzzTarget> All { get; } =
    [
        new HandshakeTarget(),
        new FrameTarget(),
        new RingTarget(),
        new StubTarget(),
        new ReplyTarget(),
        new MetadataTarget(),
        new GrpcTarget(),
    ];

    public static FuzzTarget? Find(string name) => All.FirstOrDefault(t => t.Name == name);
}

/// <summary>Reads fields off the front of a fuzz input; past its end every read returns zeros (or fewer bytes).</summary>
internal ref struct FuzzInput
{
    private ReadOnlySpan<byte> _rest;

    public FuzzInput(ReadOnlySpan<byte> data) => _rest = data;

    public readonly bool IsEmpty => _rest.IsEmpty;

    public readonly int Remaining => _rest.Length;

    public byte Byte()
    {
        if (_rest.IsEmpty)
        {
            return 0;
        }

        byte value = _rest[0];
        _rest = _rest[1..];
        return value;
    }

    public ushort UInt16() => BinaryPrimitives.ReadUInt16LittleEndian(Fixed(2));

    public int Int32() => BinaryPrimitives.ReadInt32LittleEndian(Fixed(4));

    public long Int64() => BinaryPrimitives.ReadInt64LittleEndian(Fixed(8));

    public ReadOnlySpan<byte> Bytes(int count)
    {
        count = Math.Clamp(count, 0, _rest.Length);
        ReadOnlySpan<byte> value = _rest[..count];
        _rest = _rest[count..];
        return value;
    }

    public ReadOnlySpan<byte> Rest() => Bytes(_rest.Length);

    private ReadOnlySpan<byte> Fixed(int count)
    {
        Span<byte> buffer = new byte[count];
        Bytes(count).CopyTo(buffer);
        return buffer;
    }
}

/// <summary>Writes fuzz inputs in the layout <see cref="FuzzInput"/> reads (the seed generator).</summary>
internal sealed class InputWriter
{
    private readonly MemoryStream _stream = new();

    public InputWriter Byte(int value)
    {
        _stream.WriteByte((byte)value);
        return this;
    }

    public InputWriter UInt16(int value)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, (ushort)value);
        _stream.Write(b);
        return this;
    }

    public InputWriter Int32(int value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(b, value);
        _stream.Write(b);
        return this;
    }

    public InputWriter Int64(long value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteInt64LittleEndian(b, value);
        _stream.Write(b);
        return this;
    }

    public InputWriter Bytes(ReadOnlySpan<byte> data)
    {
        _stream.Write(data);
        return this;
    }

    public byte[] ToArray() => _stream.ToArray();
}
