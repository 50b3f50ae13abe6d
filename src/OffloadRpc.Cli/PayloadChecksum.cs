using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace OffloadRpc.Cli;

/// <summary>
/// The <c>checksum</c> operation's 64-bit checksum: Fletcher-style sums over 64-bit little-endian
/// words in four lanes (a sum of the words and a sum of the running sums, so every byte counts and
/// so does its position), then the tail bytes and the length. Vectorised so that it runs at memory
/// bandwidth: the benchmark measures moving the bytes, and every system's server runs this same code.
/// Incremental, so a server that reads a stream in pieces of any size gets the same value. The
/// servers of <c>offloadrpc bench --clients</c> use it too; the peer benchmark links this file.
/// </summary>
internal struct PayloadChecksum
{
    private const int Block = 32; // four 64-bit lanes

    private Vector256<ulong> _sum;
    private Vector256<ulong> _sumOfSums;
    private long _length;
    private ulong _pendingLo;
    private ulong _pendingMid;
    private ulong _pendingHi;
    private ulong _pendingTop;
    private int _pending; // bytes of an unfinished 32-byte block, kept in the four words above

    public static ulong Compute(ReadOnlySpan<byte> data)
    {
        var checksum = default(PayloadChecksum);
        checksum.Append(data);
        return checksum.Finish();
    }

    public void Append(ReadOnlySpan<byte> data)
    {
        _length += data.Length;
        if (_pending > 0)
        {
            int take = Math.Min(Block - _pending, data.Length);
            Span<byte> block = stackalloc byte[Block];
            WritePending(block);
            data[..take].CopyTo(block[_pending..]);
            _pending += take;
            data = data[take..];
            if (_pending < Block)
            {
                ReadPending(block);
                return;
            }

            AddBlocks(block);
            _pending = 0;
        }

        int whole = data.Length / Block * Block;
        AddBlocks(data[..whole]);
        if (whole < data.Length)
        {
            Span<byte> block = stackalloc byte[Block];
            block.Clear();
            data[whole..].CopyTo(block);
            _pending = data.Length - whole;
            ReadPending(block);
        }
    }

    public readonly ulong Finish()
    {
        Vector256<ulong> sum = _sum;
        Vector256<ulong> sumOfSums = _sumOfSums;
        if (_pending > 0)
        {
            sum += Vector256.Create(_pendingLo, _pendingMid, _pendingHi, _pendingTop);
            sumOfSums += sum;
        }

        ulong h = 0x9E37_79B9_7F4A_7C15UL ^ (ulong)_length;
        for (int i = 0; i < 4; i++)
        {
            h = Mix(h ^ sum.GetElement(i));
            h = Mix(h ^ sumOfSums.GetElement(i));
        }

        return h;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static ulong Mix(ulong x)
    {
        x = (x ^ (x >> 30)) * 0xBF58_476D_1CE4_E5B9UL;
        x = (x ^ (x >> 27)) * 0x94D0_49BB_1331_11EBUL;
        return x ^ (x >> 31);
    }

    private void AddBlocks(ReadOnlySpan<byte> blocks)
    {
        ReadOnlySpan<Vector256<ulong>> vectors = MemoryMarshal.Cast<byte, Vector256<ulong>>(blocks);
        Vector256<ulong> sum = _sum;
        Vector256<ulong> sumOfSums = _sumOfSums;
        foreach (Vector256<ulong> v in vectors)
        {
            sum += BitConverter.IsLittleEndian ? v : ReverseEndianness(v);
            sumOfSums += sum;
        }

        _sum = sum;
        _sumOfSums = sumOfSums;
    }

    private static Vector256<ulong> ReverseEndianness(Vector256<ulong> v) => Vector256.Create(
        BinaryPrimitives.ReverseEndianness(v.GetElement(0)),
        BinaryPrimitives.ReverseEndianness(v.GetElement(1)),
        BinaryPrimitives.ReverseEndianness(v.GetElement(2)),
        BinaryPrimitives.ReverseEndianness(v.GetElement(3)));

    private readonly void WritePending(Span<byte> block)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(block, _pendingLo);
        BinaryPrimitives.WriteUInt64LittleEndian(block[8..], _pendingMid);
        BinaryPrimitives.WriteUInt64LittleEndian(block[16..], _pendingHi);
        BinaryPrimitives.WriteUInt64LittleEndian(block[24..], _pendingTop);
    }

    private void ReadPending(ReadOnlySpan<byte> block)
    {
        _pendingLo = BinaryPrimitives.ReadUInt64LittleEndian(block);
        _pendingMid = BinaryPrimitives.ReadUInt64LittleEndian(block[8..]);
        _pendingHi = BinaryPrimitives.ReadUInt64LittleEndian(block[16..]);
        _pendingTop = BinaryPrimitives.ReadUInt64LittleEndian(block[24..]);
    }
}
