using System.Buffers.Binary;

namespace OffloadRpc.Testing;

/// <summary>
/// Bytes defined by their absolute position, so that a stream of any length (past 2 GiB) can be produced
/// and checked piece by piece without being held: each 4 KiB block starts with its index (64-bit
/// little-endian), then a fixed fill. A piece out of place fails on the index, a corrupt one on the fill.
/// </summary>
internal static class BlockPattern
{
    public const int BlockBytes = 4096;

    private static readonly byte[] s_fill = CreateFill();

    /// <summary>Writes the pattern's bytes from <paramref name="position"/> on into <paramref name="destination"/>.</summary>
    public static void Fill(Span<byte> destination, long position)
    {
        Span<byte> block = stackalloc byte[BlockBytes];
        while (!destination.IsEmpty)
        {
            int offset = (int)(position % BlockBytes);
            int count = Math.Min(destination.Length, BlockBytes - offset);
            Expected(block, position / BlockBytes);
            block.Slice(offset, count).CopyTo(destination);
            destination = destination[count..];
            position += count;
        }
    }

    /// <summary>The first position in <paramref name="data"/> (which starts at <paramref name="position"/>) whose byte is not the pattern's, or -1.</summary>
    public static long FirstMismatch(ReadOnlySpan<byte> data, long position)
    {
        Span<byte> block = stackalloc byte[BlockBytes];
        while (!data.IsEmpty)
        {
            int offset = (int)(position % BlockBytes);
            int count = Math.Min(data.Length, BlockBytes - offset);
            Expected(block, position / BlockBytes);
            int differs = data[..count].CommonPrefixLength(block.Slice(offset, count));
            if (differs < count)
            {
                return position + differs;
            }

            data = data[count..];
            position += count;
        }

        return -1;
    }

    private static void Expected(Span<byte> block, long index)
    {
        s_fill.CopyTo(block);
        BinaryPrimitives.WriteInt64LittleEndian(block, index);
    }

    private static byte[] CreateFill()
    {
        byte[] fill = new byte[BlockBytes];
        for (int i = 0; i < fill.Length; i++)
        {
            fill[i] = (byte)((i * 7) + 13);
        }

        return fill;
    }
}
